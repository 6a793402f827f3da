"""Stream one completion from a local llama.cpp server through the pipeline.

    llama-server -m model.gguf --port 8080        # in another terminal
    LLAMA_CPP_URL=http://localhost:8080 python examples/llama_cpp_worker.py "The sky is"

Environment: LLAMA_CPP_URL, LLAMA_API_KEY (if the server runs with --api-key).
The native /completion endpoint applies no chat template: the prompt is continued as is.
See docs/workers.md.
"""

from __future__ import annotations

import asyncio
import os
import sys

from orchestrator import InferenceError, PipelineConfig, PromptRequest, spawn_pipeline
from orchestrator.workers import LlamaCppWorker

PROMPT = "The sky is blue because"


async def main(prompt: str) -> int:
    try:
        worker = LlamaCppWorker(max_tokens=64)  # reads LLAMA_CPP_URL
    except ValueError as exc:  # e.g. a URL without http://
        print(f"bad setting: {exc}", file=sys.stderr)
        return 2
    config = PipelineConfig(template="{input}")  # continue the prompt itself
    async with worker, spawn_pipeline(worker, config) as handles:
        ticket = await handles.submit(PromptRequest("example", prompt), stream=True)
        print(prompt, end="", flush=True)
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
    if not os.environ.get("LLAMA_CPP_URL"):
        print(
            "LLAMA_CPP_URL is not set: start `llama-server -m model.gguf --port 8080` and "
            "export LLAMA_CPP_URL=http://localhost:8080.",
            file=sys.stderr,
        )
        sys.exit(2)
    sys.exit(asyncio.run(main(" ".join(sys.argv[1:]) or PROMPT)))
