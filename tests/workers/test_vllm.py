"""VllmWorker: vLLM's OpenAI-compatible endpoints, through OpenAiWorker's wire format."""

from __future__ import annotations

import pytest

from orchestrator import InferenceError
from orchestrator.workers import OpenAiWorker, VllmWorker
from orchestrator.workers.openai import OpenAiCompatibleWorker
from tests.workers.fake_servers import TOKENS, FakeOpenAi, FakeServer

pytestmark = pytest.mark.anyio


def test_shares_the_openai_wire_format() -> None:
    """One implementation of the format: both workers inherit every part of it."""
    assert issubclass(VllmWorker, OpenAiCompatibleWorker)
    assert issubclass(OpenAiWorker, OpenAiCompatibleWorker)
    for method in ("_request", "_headers", "_parse_response", "_parse_event"):
        assert getattr(VllmWorker, method) is getattr(OpenAiWorker, method)


async def test_chat_goes_to_v1_chat_completions() -> None:
    async with (
        FakeServer(FakeOpenAi()) as server,
        VllmWorker(model="Qwen/Qwen2.5-0.5B-Instruct", url=server.url, system="Be brief.") as w,
    ):
        assert [t async for t in w.stream("Hi")] == TOKENS
    assert server.requests[0].path == "/v1/chat/completions"
    assert server.requests[0].json()["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]


async def test_completions_send_the_prompt_as_is() -> None:
    async with (
        FakeServer(FakeOpenAi()) as server,
        VllmWorker(model="gpt2", url=server.url, chat=False, max_tokens=16) as worker,
    ):
        assert await worker.infer("Once upon a time") == ["".join(TOKENS)]
    assert server.requests[0].path == "/v1/completions"
    assert server.requests[0].json() == {
        "model": "gpt2",
        "prompt": "Once upon a time",
        "max_tokens": 16,
    }


def test_a_system_prompt_needs_chat() -> None:
    with pytest.raises(ValueError, match="chat=True"):
        VllmWorker(model="gpt2", chat=False, system="Be brief.")


async def test_settings_default_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    async with VllmWorker(model="m") as worker:
        assert (
            repr(worker) == "VllmWorker(base_url='http://localhost:8000/v1', model='m', chat=True)"
        )
    async with FakeServer(FakeOpenAi(api_key="vllm-secret")) as server:
        monkeypatch.setenv("VLLM_URL", server.url + "/")
        monkeypatch.setenv("VLLM_API_KEY", "vllm-secret")
        async with VllmWorker(model="m") as worker:
            assert await worker.infer("Hi") == ["".join(TOKENS)]
    assert server.requests[0].headers["authorization"] == "Bearer vllm-secret"


async def test_vllm_error_bodies_are_read() -> None:
    body = {
        "object": "error",
        "message": "The model `nope` does not exist.",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }
    async with (
        FakeServer(FakeOpenAi(fail=(404, body, {}))) as server,
        VllmWorker(model="nope", url=server.url) as worker,
    ):
        with pytest.raises(InferenceError) as caught:
            await worker.infer("Hi")
    assert (caught.value.status_code, caught.value.retryable) == (404, False)
    assert str(caught.value).endswith("(NotFoundError) The model `nope` does not exist.")
    assert caught.value.worker == "vllm"
