"""Stream one answer from a vLLM server through the pipeline.

    vllm serve Qwen/Qwen2.5-0.5B-Instruct        # in another terminal (port 8000)
    VLLM_URL=http://localhost:8000 VLLM_MODEL=Qwen/Qwen2.5-0.5B-Instruct \
        python examples/vllm_worker.py "Why is the sky blue?"

Environment: VLLM_URL, VLLM_MODEL (the name `vllm serve` was given), VLLM_API_KEY (if the
server runs with --api-key), VLLM_CHAT=0 to use /v1/completions instead of chat.
See docs/workers.md.
"""

from __future__ import annotations

import asyncio
import os
import sys

from orchestrator import InferenceError, PipelineConfig, PromptRequest, spawn_pipeline
from orchestrator.workers import VllmWorker

QUESTION = "In one sentence: why is the sky blue?"


async def main(question: str, model: str) -> int:
    chat = os.environ.get("VLLM_CHAT", "1") != "0"
    try:
        worker = VllmWorker(model=model, chat=chat, max_tokens=200)  # reads VLLM_URL
    except ValueError as exc:  # e.g. a URL without http://
        print(f"bad setting: {exc}", file=sys.stderr)
        return 2
    config = PipelineConfig(template="{input}")  # a chat model wants the bare question
    async with worker, spawn_pipeline(worker, config) as handles:
        ticket = await handles.submit(PromptRequest("example", question), stream=True)
        try:
            async for token in ticket.tokens():
                print(token, end="", flush=True)
        except InferenceError as exc:
            hint = f"retryable={exc.retryable}, retry_after={exc.retry_after}"
            print(f"\nerror: {exc} ({hint})", file=sys.stderr)
            return 1
    print()
    print(f"[usage: {worker.last_usage}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    missing = [name for name in ("VLLM_URL", "VLLM_MODEL") if not os.environ.get(name)]
    if missing:
        print(
            f"{' and '.join(missing)} not set: start `vllm serve <model>` and export "
            "VLLM_URL=http://localhost:8000 and VLLM_MODEL=<model>.",
            file=sys.stderr,
        )
        sys.exit(2)
    question = " ".join(sys.argv[1:]) or QUESTION
    sys.exit(asyncio.run(main(question, os.environ["VLLM_MODEL"])))
