"""Stream one answer from Claude (Anthropic's Messages API) through the pipeline.

    ANTHROPIC_API_KEY=sk-ant-... python examples/anthropic_worker.py "Why is the sky blue?"

Environment: ANTHROPIC_API_KEY, ANTHROPIC_BASE_URL (a proxy, optional), ANTHROPIC_MODEL
(default claude-3-5-haiku-latest). See docs/workers.md.
"""

from __future__ import annotations

import asyncio
import os
import sys

from orchestrator import InferenceError, PipelineConfig, PromptRequest, spawn_pipeline
from orchestrator.workers import AnthropicWorker

QUESTION = "In one sentence: why is the sky blue?"


async def main(question: str) -> int:
    model = os.environ.get("ANTHROPIC_MODEL") or "claude-3-5-haiku-latest"
    try:
        worker = AnthropicWorker(model=model, max_tokens=200)
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
    if not os.environ.get("ANTHROPIC_API_KEY") and not os.environ.get("ANTHROPIC_BASE_URL"):
        print(
            "ANTHROPIC_API_KEY is not set: export it (from console.anthropic.com) and run again.",
            file=sys.stderr,
        )
        sys.exit(2)
    sys.exit(asyncio.run(main(" ".join(sys.argv[1:]) or QUESTION)))
