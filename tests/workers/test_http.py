"""The shared plumbing: SSE decoding, Retry-After, error bodies, transport errors."""

from __future__ import annotations

import email.utils
import itertools
import json
from typing import TYPE_CHECKING

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator import InferenceError
from orchestrator.workers import OpenAiWorker
from orchestrator.workers._wire import (
    MalformedResponse,
    SseDecoder,
    SseEvent,
    describe_error,
    parse_retry_after,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = pytest.mark.anyio


def decode(*chunks: bytes, extra: frozenset[str] = frozenset()) -> list[SseEvent]:
    decoder = SseDecoder(extra)
    return [event for chunk in chunks for event in decoder.feed(chunk)]


# -- Server-Sent Events ----------------------------------------------------------------------


def test_sse_follows_the_spec_examples() -> None:
    stream = (
        b"\xef\xbb\xbf: a comment\n"
        b"data: first\ndata:second\n\n"  # two data lines; no space after the colon
        b"event: add\nid: 7\nretry: 10\ndata: x\n\n"
        b"event: lonely\n\n"  # no data: not dispatched, and its type is forgotten
        b"data\n\n"  # a field with no colon has an empty value
        b"data:  two spaces\r\n\r\n"  # only one space is dropped; CRLF works
        b"data: cr\r\r"  # and so does a lone CR
        b"data: never finished\n"  # unterminated at the end: dropped
    )
    assert decode(stream) == [
        SseEvent("message", "first\nsecond"),
        SseEvent("add", "x"),
        SseEvent("message", ""),
        SseEvent("message", " two spaces"),
        SseEvent("message", "cr"),
    ]


def test_sse_extra_fields_name_an_event() -> None:
    assert decode(b'error: {"code": 500}\n\n', extra=frozenset({"error"})) == [
        SseEvent("error", '{"code": 500}')
    ]
    assert decode(b'error: {"code": 500}\n\n') == []


def test_sse_crlf_and_utf8_split_across_chunks() -> None:
    raw = "data: wörld 👋\r\n\r\n".encode()
    for cut in range(1, len(raw)):
        assert decode(raw[:cut], raw[cut:]) == [SseEvent("message", "wörld 👋")], cut


def test_sse_refuses_an_endless_line() -> None:
    decoder = SseDecoder()
    with pytest.raises(MalformedResponse, match="longer than"):
        decoder.feed(b"data: " + b"x" * (8 * 1024 * 1024 + 1))


_text = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]))


@given(
    events=st.lists(
        st.tuples(
            st.sampled_from(["", "message_start", "content_block_delta"]),
            st.lists(_text, min_size=1, max_size=3),
        ),
        max_size=5,
    ),
    newline=st.sampled_from(["\n", "\r\n", "\r"]),
    cuts=st.lists(st.integers(min_value=0, max_value=500), max_size=8),
)
def test_sse_decodes_the_same_however_the_bytes_are_split(
    events: list[tuple[str, list[str]]], newline: str, cuts: list[int]
) -> None:
    text = ""
    for name, lines in events:
        text += f"event: {name}{newline}" if name else ""
        text += "".join(f"data: {line}{newline}" for line in lines) + newline
    raw = text.encode()
    bounds = sorted({0, len(raw), *(c for c in cuts if c < len(raw))})
    chunks = [raw[a:b] for a, b in itertools.pairwise(bounds)]
    expected = [SseEvent(name or "message", "\n".join(lines)) for name, lines in events]
    assert decode(*chunks) == expected


# -- Retry-After and error bodies ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after": "12"}, 12.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after": "-3"}, 0.0),
        ({"retry-after": "nan"}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after-ms": "junk", "retry-after": "9"}, 9.0),
        ({"retry-after": email.utils.formatdate(1_000_030, usegmt=True)}, 30.0),
        ({"retry-after": email.utils.formatdate(999_000, usegmt=True)}, 0.0),
    ],
)
def test_retry_after_reads_seconds_milliseconds_and_dates(
    headers: dict[str, str], expected: float | None
) -> None:
    assert parse_retry_after(httpx.Headers(headers), now=1_000_000) == expected


ERROR_BODIES = [
    (
        {"error": {"message": "bad key", "type": "invalid_request_error"}},
        "(invalid_request_error) bad key",
    ),
    (
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        "(overloaded_error) Overloaded",
    ),
    (
        {"object": "error", "message": "no model", "type": "NotFoundError", "code": 404},
        "(NotFoundError) no model",
    ),
    ({"error": {"code": 503, "message": "Loading model"}}, "(503) Loading model"),
    ({"error": "model 'x' not found"}, "model 'x' not found"),
    (
        {"error": "Input validation error", "error_type": "validation"},
        "(validation) Input validation error",
    ),
    ({"detail": [{"msg": "field required"}]}, '[{"msg": "field required"}]'),
    ({"unexpected": True}, '{"unexpected": true}'),
]


@pytest.mark.parametrize(("body", "expected"), ERROR_BODIES)
def test_error_bodies_of_every_provider_are_described(body: object, expected: str) -> None:
    assert describe_error(json.dumps(body)) == expected


def test_error_text_is_quoted_and_clipped() -> None:
    assert describe_error("") == "(empty body)"
    assert describe_error("  Bad\n  Gateway ") == "Bad Gateway"
    assert len(describe_error("x" * 5000)) == 1000


# -- transport errors, through httpx.MockTransport ----------------------------------------------


def _request_errors() -> list[type[httpx.RequestError]]:
    found: list[type[httpx.RequestError]] = []
    todo: list[type[httpx.RequestError]] = [httpx.RequestError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return [cls for cls in found if cls.__module__.startswith("httpx")]


RETRYABLE = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
    httpx.ProxyError,
)


@pytest.mark.parametrize("error", _request_errors(), ids=lambda cls: cls.__name__)
async def test_every_request_error_becomes_an_inference_error(
    error: type[httpx.RequestError],
) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise error("the network said no", request=request)

    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(fail)) as client,
        OpenAiWorker(model="m", base_url="http://llm.test/v1", client=client) as worker,
    ):
        with pytest.raises(InferenceError) as caught:
            await worker.infer("Hi")
        with pytest.raises(InferenceError) as streamed:
            await anext(worker.stream("Hi"))
    for result in (caught.value, streamed.value):
        assert result.retryable is issubclass(error, RETRYABLE)
        assert result.status_code is None
        assert result.__cause__ is not None
        assert type(result.__cause__) is error
        assert "http://llm.test/v1/chat/completions" in str(result)


async def test_a_read_error_mid_stream_keeps_the_tokens_before_it() -> None:
    class Broken(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b'data: {"choices": [{"delta": {"content": "Hel"}}]}\n\n'
            raise httpx.ReadError("connection reset by peer")

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Broken())

    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client,
        OpenAiWorker(model="m", base_url="http://llm.test/v1", client=client) as worker,
    ):
        stream = worker.stream("Hi")
        assert await anext(stream) == "Hel"
        with pytest.raises(InferenceError, match="ReadError: connection reset") as caught:
            await anext(stream)
    assert caught.value.retryable


async def test_a_redirect_is_not_followed() -> None:
    def moved(request: httpx.Request) -> httpx.Response:
        return httpx.Response(301, headers={"location": "https://elsewhere.test/v1"})

    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(moved)) as client,
        OpenAiWorker(model="m", base_url="http://llm.test/v1", client=client) as worker,
    ):
        with pytest.raises(InferenceError, match="HTTP 301") as caught:
            await worker.infer("Hi")
    assert (caught.value.status_code, caught.value.retryable) == (301, False)
