"""LlamaCppWorker: llama-server's native /completion request, stream and errors."""

from __future__ import annotations

import pytest

from orchestrator import InferenceError
from orchestrator.workers import LlamaCppWorker, TokenUsage
from tests.workers.fake_servers import TOKENS, FakeLlamaCpp, FakeServer, llama_error

pytestmark = pytest.mark.anyio


async def test_infer_sends_the_prompt_as_is() -> None:
    async with (
        FakeServer(FakeLlamaCpp()) as server,
        LlamaCppWorker(url=server.url) as worker,
    ):
        assert await worker.infer("The capital of France is") == ["".join(TOKENS)]
        assert worker.last_usage == TokenUsage(prompt_tokens=9, completion_tokens=5)
    request = server.requests[0]
    assert (request.method, request.path) == ("POST", "/completion")
    assert "authorization" not in request.headers
    assert request.json() == {"prompt": "The capital of France is", "stream": False}


async def test_options_become_llama_cpp_parameters() -> None:
    async with (
        FakeServer(FakeLlamaCpp(api_key="local-secret")) as server,
        LlamaCppWorker(
            url=server.url, api_key="local-secret", max_tokens=32, temperature=0.7, stop="\n"
        ) as worker,
    ):
        assert [t async for t in worker.stream("Q: 2+2?\nA:")] == TOKENS
    assert server.requests[0].headers["authorization"] == "Bearer local-secret"
    assert server.requests[0].json() == {
        "prompt": "Q: 2+2?\nA:",
        "stream": True,
        "n_predict": 32,
        "temperature": 0.7,
        "stop": ["\n"],
    }


async def test_settings_default_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    async with LlamaCppWorker() as worker:
        assert repr(worker) == "LlamaCppWorker(base_url='http://localhost:8080')"
    async with FakeServer(FakeLlamaCpp(api_key="local-secret")) as server:
        monkeypatch.setenv("LLAMA_CPP_URL", server.url)
        monkeypatch.setenv("LLAMA_API_KEY", "local-secret")
        async with LlamaCppWorker() as worker:
            assert await worker.infer("Hi") == ["".join(TOKENS)]


async def test_an_error_line_mid_stream_raises() -> None:
    """llama-server writes ``error: {...}`` (not ``data:``) when a slot fails."""
    async with (
        FakeServer(FakeLlamaCpp(error_after=3, piece=4)) as server,
        LlamaCppWorker(url=server.url) as worker,
    ):
        stream = worker.stream("Hi")
        assert [await anext(stream) for _ in range(3)] == TOKENS[:3]
        with pytest.raises(InferenceError) as caught:
            await anext(stream)
    assert (caught.value.status_code, caught.value.retryable) == (500, True)
    assert str(caught.value).endswith("(server_error) slot unavailable")


async def test_a_model_still_loading_is_retryable() -> None:
    body = llama_error(503, "Loading model", "unavailable_error")
    async with (
        FakeServer(FakeLlamaCpp(fail=(503, body, {}))) as server,
        LlamaCppWorker(url=server.url) as worker,
    ):
        with pytest.raises(InferenceError) as caught:
            await worker.infer("Hi")
    assert (caught.value.status_code, caught.value.retryable) == (503, True)
    assert str(caught.value).endswith("(unavailable_error) Loading model")


async def test_a_bad_request_is_not_retryable() -> None:
    body = llama_error(400, "the request exceeds the available context size", "exceed_context")
    async with (
        FakeServer(FakeLlamaCpp(fail=(400, body, {}))) as server,
        LlamaCppWorker(url=server.url) as worker,
    ):
        with pytest.raises(InferenceError, match="exceeds the available context") as caught:
            [t async for t in worker.stream("Hi")]
    assert (caught.value.status_code, caught.value.retryable) == (400, False)
