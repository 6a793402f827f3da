"""Stream one answer from OpenAI, or any OpenAI-compatible server, through the pipeline.

    OPENAI_API_KEY=sk-... python examples/openai_worker.py "Why is the sky blue?"
    # Ollama, LM Studio, vLLM, llama.cpp's /v1: no key needed
    OPENAI_BASE_URL=http://localhost:11434/v1 OPENAI_MODEL=llama3.2 \
        python examples/openai_worker.py

Environment: OPENAI_API_KEY (for api.openai.com), OPENAI_BASE_URL, OPENAI_MODEL
(default gpt-4o-mini). See docs/workers.md.
"""

from __future__ import annotations

import asyncio
import os
import sys

from orchestrator import InferenceError, PipelineConfig, PromptRequest, spawn_pipeline
from orchestrator.workers import OpenAiWorker

QUESTION = "In one sentence: why is the sky blue?"


async def main(question: str) -> int:
    try:
        worker = OpenAiWorker(model=os.environ.get("OPENAI_MODEL") or "gpt-4o-mini", max_tokens=200)
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
    if not os.environ.get("OPENAI_API_KEY") and not os.environ.get("OPENAI_BASE_URL"):
        print(
            "OPENAI_API_KEY is not set: export it to use api.openai.com, or set "
            "OPENAI_BASE_URL (e.g. http://localhost:11434/v1 for Ollama) and OPENAI_MODEL.",
            file=sys.stderr,
        )
        sys.exit(2)
    sys.exit(asyncio.run(main(" ".join(sys.argv[1:]) or QUESTION)))
