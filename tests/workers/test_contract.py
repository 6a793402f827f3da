"""The contract every HTTP worker keeps, run against each one's fake server on loopback:
tokens as they arrive, errors translated with status and retry hints, cancellation that
closes the response, one pooled connection, secrets kept out of sight."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING

import anyio
import attrs
import httpx
import pytest

from orchestrator import (
    InferenceError,
    ModelWorker,
    PromptRequest,
    RequestStatus,
    metrics,
    spawn_pipeline,
)
from orchestrator.workers import (
    AnthropicWorker,
    LlamaCppWorker,
    OpenAiWorker,
    TokenUsage,
    VllmWorker,
)
from tests.workers.fake_servers import (
    TOKENS,
    Fake,
    FakeAnthropic,
    FakeLlamaCpp,
    FakeOpenAi,
    FakeServer,
    JsonObject,
    anthropic_error,
    llama_error,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from orchestrator.workers._http import HttpWorker

pytestmark = pytest.mark.anyio

KEY = "sk-test-2b7e151628aed2a6abf71589"
TEXT = "".join(TOKENS)
NOWHERE = "http://127.0.0.1:9"  # for workers that never send a request


def openai_error(status: int, message: str) -> JsonObject:
    return {"error": {"message": message, "type": "requests", "param": None, "code": None}}


def vllm_error(status: int, message: str) -> JsonObject:
    return {"object": "error", "message": message, "type": "BadRequestError", "code": status}


@attrs.frozen
class Provider:
    """One worker and the fake of its provider."""

    id: str
    fake: Callable[..., Fake]
    make: Callable[..., HttpWorker]  # (base url of the fake, **worker options)
    error_body: Callable[[int, str], JsonObject]

    def worker(self, url: str, **options: object) -> HttpWorker:
        options.setdefault("api_key", KEY)
        return self.make(url, **options)


PROVIDERS = [
    Provider(
        "openai",
        FakeOpenAi,
        lambda url, **kw: OpenAiWorker(model="gpt-test", base_url=f"{url}/v1", **kw),
        openai_error,
    ),
    Provider(
        "anthropic",
        FakeAnthropic,
        lambda url, **kw: AnthropicWorker(model="claude-test", base_url=url, **kw),
        lambda status, message: anthropic_error("rate_limit_error", message),
    ),
    Provider(
        "llama_cpp",
        FakeLlamaCpp,
        lambda url, **kw: LlamaCppWorker(url=url, **kw),
        lambda status, message: llama_error(status, message, "unavailable_error"),
    ),
    Provider(
        "vllm",
        lambda **kw: FakeOpenAi(vllm_errors=True, **kw),
        lambda url, **kw: VllmWorker(model="qwen", url=url, **kw),
        vllm_error,
    ),
    Provider(
        "vllm_completions",
        lambda **kw: FakeOpenAi(vllm_errors=True, **kw),
        lambda url, **kw: VllmWorker(model="qwen", url=url, chat=False, **kw),
        vllm_error,
    ),
]


@pytest.fixture(params=PROVIDERS, ids=[p.id for p in PROVIDERS])
def provider(request: pytest.FixtureRequest) -> Provider:
    assert isinstance(request.param, Provider)
    return request.param


async def collect(stream: AsyncIterator[str]) -> tuple[list[str], InferenceError | None]:
    """The tokens a stream yielded, and the ``InferenceError`` that ended it, if one did."""
    tokens: list[str] = []
    try:
        async for token in stream:
            tokens.append(token)
    except InferenceError as exc:
        return tokens, exc
    return tokens, None


async def test_infer_returns_the_whole_text(provider: Provider) -> None:
    async with (
        FakeServer(provider.fake(api_key=KEY)) as server,
        provider.worker(server.url) as worker,
    ):
        assert isinstance(worker, ModelWorker)
        assert await worker.infer("hi") == [TEXT]
        assert worker.last_usage == TokenUsage(prompt_tokens=9, completion_tokens=len(TOKENS))


@pytest.mark.parametrize("piece", [None, 1, 3, 7])
async def test_stream_yields_each_token_whatever_the_framing(
    provider: Provider, piece: int | None
) -> None:
    """Events split into frames of 1, 3, 7 bytes cut lines, CRLFs and UTF-8 characters."""
    async with (
        FakeServer(provider.fake(api_key=KEY, piece=piece)) as server,
        provider.worker(server.url) as worker,
    ):
        assert [t async for t in worker.stream("hi")] == TOKENS
        assert worker.last_usage == TokenUsage(prompt_tokens=9, completion_tokens=len(TOKENS))


async def test_provider_token_usage_is_counted_once_per_call(provider: Provider) -> None:
    name = provider.id.removesuffix("_completions")
    before = metrics.WORKER_TOKENS.value(name, "prompt")
    completion = metrics.WORKER_TOKENS.value(name, "completion")
    async with FakeServer(provider.fake()) as server, provider.worker(server.url) as worker:
        assert worker.name == name
        await worker.infer("hi")
        [t async for t in worker.stream("hi")]
    assert metrics.WORKER_TOKENS.value(name, "prompt") - before == 18
    assert metrics.WORKER_TOKENS.value(name, "completion") - completion == 2 * len(TOKENS)


async def test_pipeline_streams_tokens_to_the_ticket_as_they_arrive(provider: Provider) -> None:
    fake = provider.fake(gate=asyncio.Event())
    async with (
        FakeServer(fake) as server,
        provider.worker(server.url) as worker,
        spawn_pipeline(worker) as handles,
    ):
        ticket = await handles.submit(PromptRequest("s", "hi"), stream=True)
        tokens = ticket.tokens()
        with anyio.fail_after(5):
            first = await anext(tokens)  # the server holds the rest back until the gate opens
        assert first == TOKENS[0]
        assert ticket.status is RequestStatus.PROCESSING
        assert fake.gate is not None
        fake.gate.set()
        with anyio.fail_after(5):
            assert [first, *[t async for t in tokens]] == TOKENS
            assert await ticket.result() == TEXT
        assert "hi" in server.requests[0].body.decode()


async def test_pipeline_without_streaming_uses_infer(provider: Provider) -> None:
    async with (
        FakeServer(provider.fake()) as server,
        provider.worker(server.url) as worker,
        spawn_pipeline(worker) as handles,
    ):
        with anyio.fail_after(5):
            assert await handles.infer("hi", session_id="s") == TEXT
        assert not server.requests[0].json().get("stream")


async def test_pipeline_fails_the_ticket_with_the_provider_error(provider: Provider) -> None:
    body = provider.error_body(429, "slow down")
    async with (
        FakeServer(provider.fake(fail=(429, body, {"Retry-After": "7"}))) as server,
        provider.worker(server.url) as worker,
        spawn_pipeline(worker) as handles,
    ):
        ticket = await handles.submit(PromptRequest("s", "hi"), stream=True)
        with anyio.fail_after(5), pytest.raises(InferenceError) as caught:
            await ticket.result()
    assert ticket.status is RequestStatus.FAILED
    error = caught.value
    assert (error.status_code, error.retryable, error.retry_after) == (429, True, 7.0)
    assert error.worker == worker.name
    assert "slow down" in str(error)


async def test_cancelling_a_ticket_closes_the_http_response(provider: Provider) -> None:
    fake = provider.fake(gate=asyncio.Event())
    async with (
        FakeServer(fake) as server,
        provider.worker(server.url) as worker,
        spawn_pipeline(worker) as handles,
    ):
        ticket = await handles.submit(PromptRequest("s", "hi"), stream=True)
        with anyio.fail_after(5):
            await anext(ticket.tokens())
            assert await ticket.cancel()
            await server.disconnected.wait()  # the fake was still waiting at its gate
        assert ticket.status is RequestStatus.CANCELLED


async def test_closing_the_stream_closes_the_http_response(provider: Provider) -> None:
    fake = provider.fake(gate=asyncio.Event())
    async with FakeServer(fake) as server, provider.worker(server.url) as worker:
        stream = worker.stream("hi")
        with anyio.fail_after(5):
            assert await anext(stream) == TOKENS[0]
            await stream.aclose()  # type: ignore[attr-defined]
            await server.disconnected.wait()


async def test_cancelling_the_task_closes_the_response_and_stays_a_cancellation(
    provider: Provider,
) -> None:
    fake = provider.fake(gate=asyncio.Event())
    got_first = asyncio.Event()

    async def consume(worker: HttpWorker) -> None:
        async for _ in worker.stream("hi"):
            got_first.set()

    async with FakeServer(fake) as server, provider.worker(server.url) as worker:
        task = asyncio.create_task(consume(worker))
        with anyio.fail_after(5):
            await got_first.wait()
            task.cancel()
            await server.disconnected.wait()
            with pytest.raises(asyncio.CancelledError):
                await task


async def test_an_error_event_mid_stream_raises_after_the_tokens_before_it(
    provider: Provider,
) -> None:
    async with (
        FakeServer(provider.fake(error_after=2)) as server,
        provider.worker(server.url) as worker,
    ):
        tokens, error = await collect(worker.stream("hi"))
    assert tokens == TOKENS[:2]
    assert error is not None
    assert error.retryable  # each fake sends a server-side error (overloaded, server_error)
    assert "error in the event stream" in str(error)


async def test_a_connection_cut_mid_stream_is_retryable(provider: Provider) -> None:
    async with (
        FakeServer(provider.fake(cut_after=2)) as server,
        provider.worker(server.url) as worker,
    ):
        tokens, error = await collect(worker.stream("hi"))
    assert tokens == TOKENS[:2]
    assert error is not None
    assert error.retryable
    assert error.status_code is None
    assert isinstance(error.__cause__, httpx.RemoteProtocolError)


async def test_a_stream_that_ends_before_the_answer_does_is_retryable(provider: Provider) -> None:
    async with (
        FakeServer(provider.fake(truncate=True)) as server,
        provider.worker(server.url) as worker,
    ):
        tokens, error = await collect(worker.stream("hi"))
    assert tokens == TOKENS
    assert error is not None
    assert error.retryable
    assert "ended before the answer did" in str(error)


async def test_a_silent_server_hits_the_read_timeout(provider: Provider) -> None:
    async with (
        FakeServer(provider.fake(stall=True)) as server,
        provider.worker(server.url, timeout=0.2) as worker,
    ):
        with anyio.fail_after(5):
            tokens, error = await collect(worker.stream("hi"))
            await server.disconnected.wait()
    assert tokens == []
    assert error is not None
    assert error.retryable
    assert isinstance(error.__cause__, httpx.ReadTimeout)
    assert "timed out" in str(error)


async def test_a_refused_connection_is_retryable(provider: Provider) -> None:
    with socket.socket() as sock:  # a port nobody listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with provider.worker(f"http://127.0.0.1:{port}") as worker:
        with pytest.raises(InferenceError) as caught:
            await worker.infer("hi")
    assert caught.value.retryable
    assert isinstance(caught.value.__cause__, httpx.ConnectError)


@pytest.mark.parametrize(
    ("status", "retryable"), [(400, False), (404, False), (408, True), (500, True), (503, True)]
)
async def test_http_errors_carry_status_and_whether_to_retry(
    provider: Provider, status: int, retryable: bool
) -> None:
    body = provider.error_body(status, "the provider says no")
    async with (
        FakeServer(provider.fake(fail=(status, body, {}))) as server,
        provider.worker(server.url) as worker,
    ):
        with pytest.raises(InferenceError) as caught:
            await worker.infer("hi")
        _, streamed = await collect(worker.stream("hi"))
    for error in (caught.value, streamed):
        assert error is not None
        assert error.status_code == status
        assert error.retryable is retryable
        assert error.retry_after is None
        assert "the provider says no" in str(error)


async def test_a_wrong_key_is_refused_and_never_shown(
    provider: Provider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with (
        FakeServer(provider.fake(api_key="the-right-key")) as server,
        provider.worker(server.url) as worker,
    ):
        with pytest.raises(InferenceError) as caught:
            await worker.infer("hi")
        _, streamed = await collect(worker.stream("hi"))
    assert streamed is not None
    for error in (caught.value, streamed):
        assert error.status_code == 401
        assert not error.retryable
        assert KEY not in str(error)
        assert KEY not in repr(error)
    assert KEY not in repr(worker)
    assert KEY not in worker.cache_identity
    assert caplog.records  # the worker and httpx did log
    for record in caplog.records:
        assert KEY not in record.getMessage()


async def test_a_key_read_from_a_file_is_trimmed(provider: Provider) -> None:
    async with (
        FakeServer(provider.fake(api_key=KEY)) as server,
        provider.worker(server.url, api_key=f" {KEY}\n") as worker,
    ):
        assert await worker.infer("hi") == [TEXT]


@pytest.mark.parametrize("key", ["sk-\u00e9t\u00e9", "sk-a\x00b", "sk-a\nb"])
def test_a_key_no_header_can_carry_is_refused_unseen(provider: Provider, key: str) -> None:
    with pytest.raises(ValueError, match="API key") as caught:
        provider.worker(NOWHERE, api_key=key)
    assert key not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://user:hunter2@127.0.0.1:9",
        "http://:hunter2@127.0.0.1:9",
        "http://hunter2@127.0.0.1:9",  # a lone user name is often a token
        "http://user:hun/ter2@127.0.0.1:9",  # invalid, and httpx quotes the port: 'hun'
        "http://user:hun?ter2@[::1",
    ],
)
def test_credentials_in_the_url_are_refused_unseen(provider: Provider, url: str) -> None:
    """httpx would log them at INFO on every call and send them as Basic auth in place
    of the key; a provider echoing that header would show them to API clients."""
    with pytest.raises(ValueError, match="user name or password") as caught:
        provider.worker(url)
    message = str(caught.value)
    assert "hun" not in message
    assert "***@" in message
    assert "pass the key as api_key= or " in message


async def test_calls_share_one_pooled_connection(provider: Provider) -> None:
    async with FakeServer(provider.fake()) as server, provider.worker(server.url) as worker:
        await worker.infer("one")
        assert [t async for t in worker.stream("two")] == TOKENS
        await worker.infer("three")
    assert len(server.requests) == 3
    assert server.connections == 1


async def test_aclose_is_idempotent_and_a_closed_worker_refuses_calls(provider: Provider) -> None:
    worker = provider.worker(NOWHERE)
    await worker.aclose()
    await worker.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await worker.infer("hi")
    with pytest.raises(RuntimeError, match="closed"):
        await anext(worker.stream("hi"))


async def test_a_borrowed_client_is_left_open(provider: Provider) -> None:
    async with httpx.AsyncClient() as client, FakeServer(provider.fake()) as server:
        async with provider.worker(server.url, client=client) as worker:
            assert await worker.infer("hi") == [TEXT]
        assert not client.is_closed
        response = await client.post(server.url + "/nowhere", json={})
        assert response.status_code == 404


async def test_a_forgotten_worker_warns(provider: Provider) -> None:
    worker = provider.worker(NOWHERE)
    with pytest.warns(ResourceWarning, match="unclosed"):
        del worker  # CPython finalizes it here: nothing else refers to it


async def test_cache_identity_names_what_changes_answers(provider: Provider) -> None:
    async with (
        provider.worker(NOWHERE) as plain,
        provider.worker(NOWHERE, api_key="another-key") as same,
        provider.worker(NOWHERE, temperature=0.5) as warmer,
        provider.worker(NOWHERE, max_tokens=7) as shorter,
        provider.worker(NOWHERE, stop=["\n"]) as stopping,
    ):
        identities = {w.cache_identity for w in (plain, warmer, shorter, stopping)}
        assert len(identities) == 4
        assert same.cache_identity == plain.cache_identity  # the key changes no answer
        assert type(plain).__name__ in plain.cache_identity
        assert "127.0.0.1:9" in plain.cache_identity
