"""AnthropicWorker: the Messages API request, its named events, its error types."""

from __future__ import annotations

import pytest

from orchestrator import InferenceError
from orchestrator.workers import AnthropicWorker, TokenUsage
from tests.workers.fake_servers import (
    TOKENS,
    FakeAnthropic,
    FakeServer,
    Request,
    Response,
    anthropic_error,
    event,
)

pytestmark = pytest.mark.anyio

KEY = "sk-ant-test-9e107d9d372bb6826bd81d3542a419d6"


async def test_infer_sends_a_messages_request_with_key_and_version() -> None:
    async with (
        FakeServer(FakeAnthropic(api_key=KEY)) as server,
        AnthropicWorker(model="claude-test", base_url=server.url, api_key=KEY) as worker,
    ):
        assert await worker.infer("What is 2+2?") == ["".join(TOKENS)]
        assert worker.last_usage == TokenUsage(prompt_tokens=9, completion_tokens=5)
    request = server.requests[0]
    assert (request.method, request.path) == ("POST", "/v1/messages")
    assert request.headers["x-api-key"] == KEY
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in request.headers
    assert request.json() == {
        "model": "claude-test",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": "What is 2+2?"}],
    }


async def test_options_go_into_the_request() -> None:
    async with (
        FakeServer(FakeAnthropic()) as server,
        AnthropicWorker(
            model="claude-test",
            base_url=server.url,
            max_tokens=50,
            temperature=0.2,
            system="Be brief.",
            stop="END",
        ) as worker,
    ):
        assert [t async for t in worker.stream("Hi")] == TOKENS
    assert server.requests[0].json() == {
        "model": "claude-test",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "Hi"}],
        "system": "Be brief.",
        "temperature": 0.2,
        "stop_sequences": ["END"],
        "stream": True,
    }


async def test_settings_default_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="ANTHROPIC_API_KEY"):
        AnthropicWorker(model="claude-test")
    async with FakeServer(FakeAnthropic(api_key=KEY)) as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
        async with AnthropicWorker(model="claude-test") as worker:
            assert await worker.infer("Hi") == ["".join(TOKENS)]
            assert repr(worker) == (
                f"AnthropicWorker(base_url={server.url!r}, model='claude-test', max_tokens=1024)"
            )


async def test_stream_reads_text_and_skips_other_blocks_and_unknown_events() -> None:
    async def handler(request: Request, response: Response) -> None:
        start = {"type": "message_start", "message": {"usage": {"input_tokens": 4}}}
        thinking = {"type": "thinking", "thinking": ""}
        text = {"type": "text", "text": "Sure"}
        await response.start()
        for name, body in [
            ("message_start", start),
            ("content_block_start", {"type": "content_block_start", "content_block": thinking}),
            ("content_block_delta", {"delta": {"type": "thinking_delta", "thinking": "hmm"}}),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("brand_new_event", {"type": "brand_new_event"}),
            ("content_block_start", {"type": "content_block_start", "content_block": text}),
            ("content_block_delta", {"delta": {"type": "text_delta", "text": ", 4."}}),
            ("content_block_delta", {"delta": {"type": "citations_delta", "citation": {}}}),
            ("ping", {"type": "ping"}),
            (
                "message_delta",
                {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}},
            ),
            ("message_stop", {"type": "message_stop"}),
        ]:
            await response.send(event(name, body))
        await response.end()

    async with (
        FakeServer(handler) as server,
        AnthropicWorker(model="claude-test", base_url=server.url) as worker,
    ):
        assert [t async for t in worker.stream("2+2?")] == ["Sure", ", 4."]
        assert worker.last_usage == TokenUsage(prompt_tokens=4, completion_tokens=3)


@pytest.mark.parametrize(
    ("kind", "status", "retryable"),
    [
        ("overloaded_error", 529, True),
        ("api_error", 500, True),
        ("rate_limit_error", 429, True),
        ("invalid_request_error", 400, False),
        ("some_future_error", None, False),
    ],
)
async def test_an_error_event_carries_its_type_and_retryability(
    kind: str, status: int | None, retryable: bool
) -> None:
    fake = FakeAnthropic(error_after=1, error_event=event("error", anthropic_error(kind, "nope")))
    async with (
        FakeServer(fake) as server,
        AnthropicWorker(model="claude-test", base_url=server.url) as worker,
    ):
        stream = worker.stream("Hi")
        assert await anext(stream) == TOKENS[0]
        with pytest.raises(InferenceError) as caught:
            await anext(stream)
    assert (caught.value.status_code, caught.value.retryable) == (status, retryable)
    assert str(caught.value) == f"anthropic: error in the event stream: ({kind}) nope"


async def test_overloaded_before_the_stream_is_retryable() -> None:
    body = anthropic_error("overloaded_error", "Overloaded")
    async with (
        FakeServer(FakeAnthropic(fail=(529, body, {"request-id": "req_011"}))) as server,
        AnthropicWorker(model="claude-test", base_url=server.url) as worker,
    ):
        with pytest.raises(InferenceError) as caught:
            [t async for t in worker.stream("Hi")]
    assert (caught.value.status_code, caught.value.retryable) == (529, True)
    assert str(caught.value).endswith(
        "HTTP 529 Overloaded from " + server.url + "/v1/messages: "
        "(overloaded_error) Overloaded [request id req_011]"
    )


async def test_a_stream_without_message_stop_is_incomplete() -> None:
    async with (
        FakeServer(FakeAnthropic(truncate=True)) as server,
        AnthropicWorker(model="claude-test", base_url=server.url) as worker,
    ):
        with pytest.raises(InferenceError, match="ended before the answer did"):
            [t async for t in worker.stream("Hi")]


def test_max_tokens_is_required_and_positive() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        AnthropicWorker(model="claude-test", api_key=KEY, max_tokens=0)
