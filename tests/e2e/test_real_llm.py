"""Opt-in, against a real local model: ``nox -s e2e`` (or ``pytest -m e2e`` with
``LLM_URL`` and ``LLM_MODEL_ID`` set, as ``start_real_llm.sh`` prints them).

A small model on llama-cpp-python's OpenAI-compatible server: the answers are not judged,
only that real tokens stream through the workers, the pipeline and the server.
"""

from __future__ import annotations

import json
import os

import anyio
import httpx
import pytest

from orchestrator import PipelineConfig, PromptRequest, RequestStatus, spawn_pipeline
from orchestrator.workers import OpenAiWorker, VllmWorker
from orchestrator_server import ServerConfig, create_app
from tests.server.conftest import serve

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

URL = os.environ.get("LLM_URL", "")
MODEL = os.environ.get("LLM_MODEL_ID", "")


@pytest.fixture(autouse=True)
def _need_a_model() -> None:
    if not URL or not MODEL:
        pytest.skip("set LLM_URL and LLM_MODEL_ID (start_real_llm.sh prints them)")


def chat_worker() -> OpenAiWorker:
    return OpenAiWorker(model=MODEL, base_url=f"{URL}/v1", max_tokens=24, temperature=0)


async def test_chat_infer_and_stream_agree_on_a_real_model() -> None:
    async with chat_worker() as worker:
        whole = "".join(await worker.infer("Say hello."))
        streamed = [t async for t in worker.stream("Say hello.")]
    assert whole.strip()
    assert len(streamed) > 1  # token by token, not one block
    assert "".join(streamed) == whole  # temperature 0: the same answer
    assert worker.last_usage is not None
    assert worker.last_usage.prompt_tokens


async def test_completions_endpoint_through_vllm_worker() -> None:
    worker = VllmWorker(model=MODEL, url=URL, chat=False, max_tokens=16, temperature=0)
    async with worker:
        text = "".join(await worker.infer("The capital of France is"))
    assert text.strip()


async def test_tokens_stream_through_the_pipeline() -> None:
    config = PipelineConfig(template="{input}", request_timeout=120)
    async with chat_worker() as worker, spawn_pipeline(worker, config) as handles:
        ticket = await handles.submit(PromptRequest("e2e", "Count to five."), stream=True)
        tokens = []
        with anyio.fail_after(120):
            async for token in ticket.tokens():
                tokens.append(token)
        assert ticket.status is RequestStatus.COMPLETED
        assert "".join(tokens) == await ticket.result()
        assert len(tokens) > 1


async def test_the_server_streams_a_real_answer_over_sse() -> None:
    async with chat_worker() as worker, spawn_pipeline(worker) as handles:
        app = create_app(handles, ServerConfig(access_log=False))
        body = {"prompt": "Name a color.", "stream": True}
        async with (
            serve(app) as base,
            httpx.AsyncClient(base_url=base, timeout=120) as client,
            client.stream("POST", "/api/v1/infer", json=body) as response,
        ):
            events = [
                json.loads(line[6:])
                async for line in response.aiter_lines()
                if line.startswith("data: ")
            ]
    tokens = [e["token"] for e in events if "token" in e]
    assert events[-1]["status"] == "completed"
    assert "".join(tokens).strip()
