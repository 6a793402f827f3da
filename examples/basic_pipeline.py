"""The pipeline in twenty lines: submit prompts, stream one, wait for all.

python examples/basic_pipeline.py
"""

from __future__ import annotations

import asyncio

from orchestrator import EchoWorker, PipelineConfig, PromptRequest, spawn_pipeline


async def main() -> None:
    config = PipelineConfig(max_concurrency=8, request_timeout=30)
    async with spawn_pipeline(EchoWorker(), config) as handles:
        # One call: submit and wait.
        print(await handles.infer("What is the capital of France?", session_id="user-123"))

        # Many at once, with priorities; each gets a Ticket.
        tickets = [
            await handles.submit(
                PromptRequest(session=f"user-{i}", input=f"Question {i}", meta={"priority": p})
            )
            for i, p in enumerate(["low", "normal", "high", "critical"])
        ]

        # Tokens as the worker produces them.
        streamed = await handles.submit(PromptRequest("user-9", "Stream me, please"), stream=True)
        async for token in streamed.tokens():
            print(token, end="", flush=True)
        print()

        for ticket in tickets:
            text = await ticket.result()
            print(f"{ticket.request_id} {ticket.status}: {text.splitlines()[-3]}")


if __name__ == "__main__":
    asyncio.run(main())
