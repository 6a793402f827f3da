"""OpenAiWorker: what it sends, what it reads, and where it finds its settings."""

from __future__ import annotations

import pytest

from orchestrator import InferenceError
from orchestrator.workers import OpenAiWorker
from tests.workers.fake_servers import TOKENS, FakeOpenAi, FakeServer, Request, Response, data

pytestmark = pytest.mark.anyio

KEY = "sk-test-openai-5f4dcc3b5aa765d61d83"


async def test_infer_sends_a_chat_completion_with_bearer_auth() -> None:
    async with (
        FakeServer(FakeOpenAi(api_key=KEY)) as server,
        OpenAiWorker(model="gpt-test", base_url=f"{server.url}/v1", api_key=KEY) as worker,
    ):
        assert await worker.infer("What is 2+2?") == ["".join(TOKENS)]
    request = server.requests[0]
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "application/json"
    assert request.json() == {
        "model": "gpt-test",
        "messages": [{"role": "user", "content": "What is 2+2?"}],
    }


async def test_options_go_into_the_request() -> None:
    async with (
        FakeServer(FakeOpenAi()) as server,
        OpenAiWorker(
            model="gpt-test",
            base_url=f"{server.url}/v1/",
            max_tokens=64,
            temperature=0.0,
            system="Answer in French.",
            stop=["\n\n", "END"],
        ) as worker,
    ):
        assert [t async for t in worker.stream("Hi")] == TOKENS
    assert server.requests[0].path == "/v1/chat/completions"
    assert server.requests[0].json() == {
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hi"},
        ],
        "max_tokens": 64,
        "temperature": 0.0,
        "stop": ["\n\n", "END"],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def test_stream_usage_can_be_turned_off_for_strict_servers() -> None:
    async with (
        FakeServer(FakeOpenAi()) as server,
        OpenAiWorker(model="m", base_url=server.url + "/v1", stream_usage=False) as worker,
    ):
        assert [t async for t in worker.stream("Hi")] == TOKENS
        assert worker.last_usage is None  # the server was not asked for it
    assert "stream_options" not in server.requests[0].json()


async def test_a_local_server_needs_no_key_and_gets_no_auth_header() -> None:
    """Ollama, LM Studio, TGI: OpenAI-compatible, no key."""
    async with (
        FakeServer(FakeOpenAi()) as server,
        OpenAiWorker(model="llama3.2", base_url=f"{server.url}/v1", name="ollama") as worker,
    ):
        assert await worker.infer("Hi") == ["".join(TOKENS)]
        assert worker.name == "ollama"
    assert "authorization" not in server.requests[0].headers


async def test_settings_default_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    async with FakeServer(FakeOpenAi(api_key=KEY)) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", f"{server.url}/v1")
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        async with OpenAiWorker(model="gpt-test") as worker:
            assert await worker.infer("Hi") == ["".join(TOKENS)]
    assert server.requests[0].headers["authorization"] == f"Bearer {KEY}"


async def test_the_public_api_needs_a_key() -> None:
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        OpenAiWorker(model="gpt-4o-mini")
    async with OpenAiWorker(model="gpt-4o-mini", api_key=KEY) as worker:
        assert worker.cache_identity.startswith('{"base_url": "https://api.openai.com/v1"')
        assert repr(worker) == (
            "OpenAiWorker(base_url='https://api.openai.com/v1', model='gpt-4o-mini', chat=True)"
        )


async def test_an_echoed_key_is_redacted() -> None:
    """OpenAI's 401 quotes the key it got (masked; a proxy may not mask it)."""
    async with (
        FakeServer(FakeOpenAi(api_key="sk-right")) as server,
        OpenAiWorker(model="m", base_url=f"{server.url}/v1", api_key=KEY) as worker,
    ):
        with pytest.raises(InferenceError) as caught:
            await worker.infer("Hi")
    message = str(caught.value)
    assert message.startswith("openai: HTTP 401 Unauthorized from http://127.0.0.1:")
    assert "(invalid_request_error) Incorrect API key provided: [redacted]." in message
    assert KEY not in message


def test_a_password_in_openai_base_url_is_refused_unseen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://user:hunter2@127.0.0.1:9/v1")
    with pytest.raises(ValueError, match="OPENAI_API_KEY") as caught:
        OpenAiWorker(model="m")
    assert "'http://user:***@127.0.0.1:9/v1'" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_a_query_is_refused_without_quoting_it() -> None:
    with pytest.raises(ValueError, match="query") as caught:
        OpenAiWorker(model="m", base_url="http://127.0.0.1:9/v1?api-key=sk-hunter2")
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("headers", "retry_after"),
    [({"retry-after-ms": "1500"}, 1.5), ({"Retry-After": "20"}, 20.0), ({}, None)],
)
async def test_rate_limits_say_when_to_retry(
    headers: dict[str, str], retry_after: float | None
) -> None:
    body = {"error": {"message": "Rate limit reached", "type": "requests", "code": None}}
    async with (
        FakeServer(FakeOpenAi(fail=(429, body, {"x-request-id": "req_42", **headers}))) as s,
        OpenAiWorker(model="m", base_url=f"{s.url}/v1") as worker,
    ):
        with pytest.raises(InferenceError) as caught:
            await worker.infer("Hi")
    error = caught.value
    assert (error.status_code, error.retryable, error.retry_after) == (429, True, retry_after)
    assert str(error).endswith("(requests) Rate limit reached [request id req_42]")


async def test_x_should_retry_overrides_the_status() -> None:
    body = {"error": {"message": "conflict", "type": "conflict"}}
    async with (
        FakeServer(FakeOpenAi(fail=(409, body, {"x-should-retry": "true"}))) as server,
        OpenAiWorker(model="m", base_url=f"{server.url}/v1") as worker,
    ):
        with pytest.raises(InferenceError) as caught:
            await worker.infer("Hi")
    assert caught.value.retryable


async def test_a_gateway_page_is_quoted_as_text() -> None:
    page = "<html><body>\n<h1>502 Bad Gateway</h1>\n</body></html>"
    async with (
        FakeServer(FakeOpenAi(fail=(502, page, {}))) as server,
        OpenAiWorker(model="m", base_url=f"{server.url}/v1") as worker,
    ):
        with pytest.raises(InferenceError) as caught:
            await worker.infer("Hi")
    assert caught.value.retryable
    assert str(caught.value).endswith("<html><body> <h1>502 Bad Gateway</h1> </body></html>")


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        (b"not json", "invalid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"id": "x"}', "expected an array at 'choices'"),
        (b'{"choices": []}', "no choices"),
        (b'{"choices": [{"message": {"content": 42}}]}', "expected a string at 'content'"),
    ],
)
async def test_a_malformed_answer_is_an_inference_error(body: bytes, complaint: str) -> None:
    async def handler(request: Request, response: Response) -> None:
        await response.body(200, body)

    async with (
        FakeServer(handler) as server,
        OpenAiWorker(model="m", base_url=f"{server.url}/v1") as worker,
    ):
        with pytest.raises(InferenceError, match=complaint) as caught:
            await worker.infer("Hi")
    assert (caught.value.status_code, caught.value.retryable) == (200, False)
    assert isinstance(caught.value.__cause__, ValueError)


async def test_stream_skips_empty_deltas_and_chunks_without_choices() -> None:
    """Azure sends content-filter results first; tool calls carry no content."""

    async def handler(request: Request, response: Response) -> None:
        chunks: list[object] = [
            {"choices": [], "prompt_filter_results": []},
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]},
            {"choices": [{"index": 0, "delta": {"content": "Hi"}}]},
            {"choices": [{"index": 0, "delta": {"tool_calls": []}}]},
            {"choices": [{"index": 0, "delta": {"content": " there"}}], "usage": None},
        ]
        await response.start()
        for chunk in chunks:
            await response.send(data(chunk))
        await response.send(": keep-alive comment\n\ndata: [DONE]\n\n")
        await response.end()

    async with (
        FakeServer(handler) as server,
        OpenAiWorker(model="m", base_url=f"{server.url}/v1") as worker,
    ):
        assert [t async for t in worker.stream("Hi")] == ["Hi", " there"]
        assert worker.last_usage is None


async def test_a_connection_cut_after_done_loses_nothing() -> None:
    async def handler(request: Request, response: Response) -> None:
        await response.start()
        await response.send(data({"choices": [{"index": 0, "delta": {"content": "Hi"}}]}))
        await response.send("data: [DONE]\n\n")
        response.cut()  # no terminating chunk

    async with (
        FakeServer(handler) as server,
        OpenAiWorker(model="m", base_url=f"{server.url}/v1") as worker,
    ):
        assert [t async for t in worker.stream("Hi")] == ["Hi"]


async def test_a_stream_error_with_a_client_status_is_not_retryable() -> None:
    error = {"error": {"message": "context too long", "type": "BadRequestError", "code": 400}}
    async with (
        FakeServer(FakeOpenAi(error_after=1, error_event=data(error))) as server,
        OpenAiWorker(model="m", base_url=f"{server.url}/v1") as worker,
    ):
        stream = worker.stream("Hi")
        assert await anext(stream) == TOKENS[0]
        with pytest.raises(InferenceError, match="context too long") as caught:
            await anext(stream)
    assert (caught.value.status_code, caught.value.retryable) == (400, False)


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"model": ""}, "model"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"timeout": 0}, "timeouts"),
        ({"connect_timeout": -1}, "timeouts"),
        ({"base_url": "ftp://example.com/v1"}, "http"),
        ({"base_url": "http://[::1"}, "invalid URL"),
        ({"base_url": "http://localhost:8080/v1?key=1"}, "query"),
    ],
)
def test_bad_options_are_refused_before_anything_opens(
    options: dict[str, object], complaint: str
) -> None:
    settings: dict[str, object] = {"model": "m", "base_url": "http://localhost:1/v1", **options}
    with pytest.raises(ValueError, match=complaint):
        OpenAiWorker(**settings)  # type: ignore[arg-type]
