"""Hostile clients against the server ``start_server`` runs (``build_server`` on a real
loopback port): what a probe found, pinned, and a fuzzer over the two ways in.

Raw HTTP goes through ``asyncio.open_connection`` and is read to EOF; WebSocket clients
are ``websockets``'. Every answer, uvicorn's own included, must be JSON. Section numbers
are the probe's item numbers (issue 8).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import attrs
import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.sync.client import connect as connect_sync

from orchestrator import EchoWorker, PipelineConfig, spawn_pipeline
from orchestrator.enhanced import CacheLayer
from orchestrator_server import ServerConfig, create_app
from tests.helpers import GateWorker
from tests.server.conftest import recv, serve_edge, ws_url

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from orchestrator import ModelWorker

QUIET = ServerConfig(access_log=False)
DEEP = 100_000  # far past any parser's recursion limit (CPython's is 1,000)
ECHO = attrs.evolve(QUIET, timeout_seconds=5, drain_seconds=0.5)


@asynccontextmanager
async def edge(
    worker: ModelWorker | None = None,
    pipeline: PipelineConfig | None = None,
    **settings: Any,
) -> AsyncIterator[str]:
    """The edge server over a pipeline of ``worker``; yields its base URL."""
    config = attrs.evolve(QUIET, **settings)
    async with (
        spawn_pipeline(worker or EchoWorker.with_delay(0), pipeline) as handles,
        serve_edge(create_app(handles, config), config) as (base, _server),
    ):
        yield base


@attrs.frozen
class Raw:
    """One HTTP/1.1 response read off a socket."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json"
        return json.loads(self.body)


def parse_response(data: bytes) -> Raw:
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data[:200]!r}"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    version, status, _reason = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert int(headers["content-length"]) == len(body)
    return Raw(int(status), headers, body)


async def open_socket(base: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = base.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def read_to_eof(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, start: bytes = b""
) -> Raw:
    """The whole response (``start``: its bytes read already): the server must close the
    connection after it."""
    try:
        with anyio.fail_after(5):
            data = start + await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return parse_response(data)


async def read_one(reader: asyncio.StreamReader) -> Raw:
    """One response off a connection that stays open (its body by ``Content-Length``)."""
    with anyio.fail_after(5):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").lower().split("\r\n")
        length = next(int(ln.split(":", 1)[1]) for ln in lines if ln.startswith("content-length:"))
        body = await reader.readexactly(length)
    return parse_response(head + body)


async def exchange(base: str, data: bytes) -> Raw:
    reader, writer = await open_socket(base)
    writer.write(data)
    await writer.drain()
    return await read_to_eof(reader, writer)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.fixture(scope="module")
def echo_server() -> Iterator[str]:
    """The example server's shape (echo worker, dedup, an in-memory cache) behind the edge,
    served from a thread of its own: one for the module, for its sync hypothesis tests and
    for the async tests that need no worker or setting of their own."""
    started: queue.Queue[tuple[str, asyncio.AbstractEventLoop, asyncio.Event] | BaseException]
    started = queue.Queue()

    async def main() -> None:
        stop = asyncio.Event()
        pipeline = PipelineConfig(cache=CacheLayer.new_memory(1000), dedup=True)
        async with (
            spawn_pipeline(EchoWorker.with_delay(0), pipeline) as handles,
            serve_edge(create_app(handles, ECHO), ECHO) as (base, _server),
        ):
            started.put((base, asyncio.get_running_loop(), stop))
            await stop.wait()

    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # handed to the test thread
            failure.append(exc)
            started.put(exc)

    thread = threading.Thread(target=run, name="echo-server")
    thread.start()
    ready = started.get(timeout=10)
    if isinstance(ready, BaseException):
        thread.join()
        raise ready
    base, loop, stop = ready
    try:
        yield base
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)
        assert not thread.is_alive(), "the echo server did not stop"
        if failure:
            raise failure[0]


# -- 1. nesting --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(nested(DEEP), id="whole-body"),
        pytest.param(b'{"prompt": "hi", "metadata": {"k": ' + nested(DEEP) + b"}}", id="metadata"),
        pytest.param(b'{"a": ' * DEEP + b"1" + b"}" * DEEP, id="objects"),
    ],
)
async def test_deeply_nested_json_is_a_400(echo_server: str, body: bytes) -> None:
    async with httpx.AsyncClient(base_url=echo_server) as client:
        response = await client.post(
            "/api/v1/infer", content=body, headers={"content-type": "application/json"}
        )
    assert response.status_code == 400
    assert response.json() == {"error": "the JSON is nested too deeply"}
    assert response.headers["x-request-id"]


async def test_deeply_nested_ws_message_is_an_error_frame_and_the_socket_carries_on() -> None:
    worker = GateWorker()
    async with edge(worker) as base, connect(ws_url(base)) as ws:
        await ws.send(json.dumps({"prompt": "in flight"}))
        processing = await recv(ws)
        await ws.send(nested(DEEP).decode())
        whole = await recv(ws)
        await ws.send('{"prompt": "hi", "metadata": {"k": ' + nested(DEEP).decode() + "}}")
        inside = await recv(ws)
        worker.gate.set()
        completed = await recv(ws)
    assert processing["status"] == "processing"
    assert whole == inside == {"error": "the JSON is nested too deeply"}
    assert completed["request_id"] == processing["request_id"]
    assert completed["status"] == "completed"


# -- 2. lone surrogates ------------------------------------------------------------------------

SURROGATE_ESCAPE = b"\\ud800"
SURROGATE_RAW = b"\xed\xa0\x80"  # what \ud800 would be in UTF-8, if it had a UTF-8 form


def _with_surrogate(field: str, surrogate: bytes) -> bytes:
    text = b'"hello ' + surrogate + b' world"'
    if field == "prompt":
        return b'{"prompt": ' + text + b"}"
    if field == "session_id":
        return b'{"prompt": "hi", "session_id": ' + text + b"}"
    return b'{"prompt": "hi", "metadata": {"tag": ' + text + b"}}"


@pytest.mark.parametrize("surrogate", [SURROGATE_ESCAPE, SURROGATE_RAW], ids=["escape", "raw"])
@pytest.mark.parametrize(
    ("field", "named"),
    [("prompt", "'prompt'"), ("session_id", "'session_id'"), ("metadata", "'metadata.tag'")],
)
async def test_a_lone_surrogate_is_a_400_naming_the_field(
    echo_server: str, field: str, named: str, surrogate: bytes
) -> None:
    async with httpx.AsyncClient(base_url=echo_server) as client:
        response = await client.post(
            "/api/v1/infer",
            content=_with_surrogate(field, surrogate),
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 400
    error = response.json()["error"]
    assert named in error
    assert "surrogate" in error


async def test_a_lone_surrogate_over_websocket_is_an_error_frame(echo_server: str) -> None:
    async with connect(ws_url(echo_server)) as ws:
        await ws.send(_with_surrogate("prompt", SURROGATE_ESCAPE).decode())
        escaped = await recv(ws)
        await ws.send(_with_surrogate("metadata", SURROGATE_ESCAPE).decode())
        in_metadata = await recv(ws)
        await ws.send(_with_surrogate("prompt", SURROGATE_RAW))  # a bytes frame
        raw = await recv(ws)
        await ws.send(json.dumps({"prompt": "still here"}))
        processing = await recv(ws)
        completed = await recv(ws)
    assert "'prompt'" in escaped["error"]
    assert "'metadata.tag'" in in_metadata["error"]
    assert raw == {"error": "message is not valid UTF-8 JSON"}
    assert completed["request_id"] == processing["request_id"]
    assert completed["status"] == "completed"


class SurrogateWorker:
    """A model that answers text no UTF-8 encoder accepts."""

    name = "surrogate"

    async def infer(self, prompt: str) -> list[str]:
        return ["a\ud800b"]

    async def stream(self, prompt: str) -> AsyncIterator[str]:
        yield "a\ud800b"


async def test_a_worker_producing_a_lone_surrogate_is_still_answered_in_json() -> None:
    async with edge(SurrogateWorker()) as base, httpx.AsyncClient(base_url=base) as client:
        submitted = await client.post("/api/v1/infer", json={"prompt": "hi"})
        request_id = submitted.json()["request_id"]
        result = await client.get(f"/api/v1/result/{request_id}")
        status = await client.get(f"/api/v1/status/{request_id}")
        streamed = await client.post("/api/v1/infer", json={"prompt": "hi again", "stream": True})
        async with connect(ws_url(base)) as ws:
            await ws.send(json.dumps({"prompt": "hi over ws"}))
            await recv(ws)
            frame = await recv(ws)
    assert submitted.status_code == 200
    for response in (result, status):
        assert response.status_code == 200
        assert response.content.isascii()
        assert b"a\\ud800b" in response.content
        assert response.json()["request_id"] == request_id
        assert response.json()["result"] == "a\ud800b"
        assert response.json()["status"] == "completed"
    assert streamed.status_code == 200
    assert streamed.content.isascii()
    assert json.loads(streamed.text.strip().rsplit("data: ", 1)[1])["result"] == "a\ud800b"
    assert frame["result"] == "a\ud800b"


# -- 3. content types --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["text/plain", None, "application/x-www-form-urlencoded", "application/jsonx"]
)
async def test_a_body_that_is_not_declared_json_is_a_415(
    echo_server: str, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    async with httpx.AsyncClient(base_url=echo_server) as client:
        response = await client.post("/api/v1/infer", content=b'{"prompt": "hi"}', headers=headers)
    assert response.status_code == 415
    assert "Content-Type: application/json" in response.json()["error"]


@pytest.mark.parametrize(
    "content_type",
    ["application/json; charset=utf-8", "application/vnd.foo+json", "Application/JSON"],
)
async def test_json_media_types_are_accepted(echo_server: str, content_type: str) -> None:
    async with httpx.AsyncClient(base_url=echo_server) as client:
        response = await client.post(
            "/api/v1/infer", content=b'{"prompt": "hi"}', headers={"content-type": content_type}
        )
    assert response.status_code == 200
    assert response.json()["request_id"]


# -- 4. uvicorn's own answers and CORS ---------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(
            b"POST /api/v1/infer HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
            id="bad-content-length",
        ),
        pytest.param(b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n", id="unknown-method"),
        pytest.param(
            b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", id="100kb-request-line"
        ),
    ],
)
async def test_requests_uvicorn_refuses_get_a_json_400_with_an_id(
    echo_server: str, request_bytes: bytes
) -> None:
    response = await exchange(echo_server, request_bytes)
    assert response.status == 400
    assert response.json() == {"error": "malformed HTTP request"}
    assert response.headers["x-request-id"]
    assert response.headers["connection"] == "close"


async def test_cors_preflights_are_answered_in_json() -> None:
    preflight = {"Access-Control-Request-Method": "POST"}
    async with (
        edge(cors_origins="https://good.example") as base,
        httpx.AsyncClient(base_url=base) as client,
    ):
        refused = await client.options(
            "/api/v1/infer", headers={**preflight, "Origin": "https://evil.example"}
        )
        allowed = await client.options(
            "/api/v1/infer", headers={**preflight, "Origin": "https://good.example"}
        )
    assert refused.status_code == 400
    assert refused.headers["content-type"] == "application/json"
    assert refused.json()["error"].startswith("Disallowed CORS origin")
    assert refused.headers["x-request-id"]
    assert "access-control-allow-origin" not in refused.headers
    assert allowed.status_code == 200
    assert allowed.headers["content-type"] == "application/json"
    assert allowed.json() == {"status": "ok"}
    assert allowed.headers["x-request-id"]
    assert allowed.headers["access-control-allow-origin"] == "https://good.example"


# -- 5. the access log -------------------------------------------------------------------------


class _Arrived(logging.Handler):
    """Sets ``event`` once a record arrives: the access line is written after the response."""

    def __init__(self) -> None:
        super().__init__()
        self.event = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.event.set()


async def test_control_characters_in_the_path_are_escaped_in_the_access_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="orchestrator_server.access")
    arrived = _Arrived()
    access = logging.getLogger("orchestrator_server.access")
    access.addHandler(arrived)
    try:
        async with edge(access_log=True) as base:
            response = await exchange(
                base,
                b"GET /x%0aFORGED%20200%1b[31mred HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            with anyio.fail_after(5):
                await arrived.event.wait()
    finally:
        access.removeHandler(arrived)
    assert response.status == 404
    [record] = [r for r in caplog.records if r.name == "orchestrator_server.access"]
    for text in (record.getMessage(), caplog.handler.format(record), record.__dict__["path"]):
        assert "\n" not in text
        assert "\x1b" not in text
        assert "/x\\x0aFORGED 200\\x1b[31mred" in text


# -- 12. slow, silent and too many connections -------------------------------------------------


async def test_a_silent_connection_is_answered_408_and_closed() -> None:
    async with edge(header_timeout=0.2) as base:
        started = time.monotonic()
        reader, writer = await open_socket(base)
        response = await read_to_eof(reader, writer)
        elapsed = time.monotonic() - started
    assert response.status == 408
    assert "within 0.2s" in response.json()["error"]
    assert response.headers["x-request-id"]
    assert elapsed >= 0.19


async def test_a_slowloris_head_is_answered_408_though_bytes_keep_coming() -> None:
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"
    async with edge(header_timeout=0.2) as base:
        reader, writer = await open_socket(base)
        sent = 0
        with anyio.fail_after(5):
            first = b""
            while not first:
                writer.write(head[sent : sent + 1])
                sent += 1
                await writer.drain()
                # The pace of a slowloris: a byte, then up to 20 ms waiting for the answer.
                with anyio.move_on_after(0.02):
                    first = await reader.read(1)
        response = await read_to_eof(reader, writer, first)
    assert response.status == 408
    assert response.headers["x-request-id"]
    assert sent < len(head) // 2  # answered long before the head could have been complete


async def test_requests_that_arrive_in_time_are_served_though_they_outlast_the_timeout() -> None:
    worker = GateWorker()  # never answers: the request ends at its own deadline, 0.5 s
    health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    async with (
        edge(worker, header_timeout=0.2) as base,
        httpx.AsyncClient(base_url=base) as client,
    ):
        reader, writer = await open_socket(base)
        writer.write(health)
        first = await read_one(reader)
        started = time.monotonic()
        submitted = await client.post("/api/v1/infer", json={"prompt": "x", "timeout": 0.5})
        result = await client.get(f"/api/v1/result/{submitted.json()['request_id']}")
        waited = time.monotonic() - started
        writer.write(health)  # after a keep-alive pause longer than the header timeout
        second = await read_one(reader)
        writer.close()
    assert first.status == second.status == 200
    assert result.status_code == 200  # not cut off by the header timeout while it waits
    assert result.json()["status"] == "timeout"
    assert waited > 0.2


async def test_a_connection_over_the_limit_is_503_until_silent_ones_time_out() -> None:
    async with edge(header_timeout=0.5, max_connections=3) as base:
        silent = [await open_socket(base) for _ in range(3)]
        refused = await read_to_eof(*await open_socket(base))
        timed_out = [await read_to_eof(reader, writer) for reader, writer in silent]
        async with httpx.AsyncClient(base_url=base) as client:
            health = await client.get("/health")
    assert refused.status == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["x-request-id"]
    assert "too many open connections" in refused.json()["error"]
    assert [r.status for r in timed_out] == [408, 408, 408]
    assert health.status_code == 200


# -- 20. a body's timeout, and cancelling ------------------------------------------------------


async def test_a_body_timeout_ends_the_request_as_timeout() -> None:
    worker = GateWorker()
    async with edge(worker) as base, httpx.AsyncClient(base_url=base) as client:
        submitted = await client.post("/api/v1/infer", json={"prompt": "x", "timeout": 0.05})
        result = await client.get(f"/api/v1/result/{submitted.json()['request_id']}")
    assert submitted.status_code == 200
    assert result.status_code == 200
    assert result.json()["status"] == "timeout"


@pytest.mark.parametrize("timeout", [0, -1, "x", True, ECHO.timeout_seconds + 0.5, [1]])
async def test_a_bad_body_timeout_is_a_400_naming_it(echo_server: str, timeout: object) -> None:
    async with httpx.AsyncClient(base_url=echo_server) as client:
        response = await client.post("/api/v1/infer", json={"prompt": "x", "timeout": timeout})
    assert response.status_code == 400
    assert "'timeout'" in response.json()["error"]


async def test_delete_cancels_a_request_in_flight_and_its_worker_call() -> None:
    worker = GateWorker()
    async with edge(worker) as base, httpx.AsyncClient(base_url=base) as client:
        request_id = (await client.post("/api/v1/infer", json={"prompt": "x"})).json()["request_id"]
        with anyio.fail_after(5):
            await worker.wait_started(1)
        cancelled = await client.delete(f"/api/v1/requests/{request_id}")
        status = await client.get(f"/api/v1/status/{request_id}")
    assert cancelled.status_code == 200
    assert cancelled.json()["request_id"] == request_id
    assert cancelled.json()["status"] == "cancelled"
    assert worker.cancelled == 1
    assert status.json()["status"] == "cancelled"


async def test_delete_leaves_a_finished_request_as_it_is_and_unknown_ids_are_404(
    echo_server: str,
) -> None:
    async with httpx.AsyncClient(base_url=echo_server) as client:
        request_id = (await client.post("/api/v1/infer", json={"prompt": "x"})).json()["request_id"]
        result = await client.get(f"/api/v1/result/{request_id}")
        deleted = await client.delete(f"/api/v1/requests/{request_id}")
        unknown = await client.delete("/api/v1/requests/no-such-request")
    assert result.json()["status"] == "completed"
    assert deleted.status_code == 200
    assert deleted.json() == result.json()
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "unknown request id"}


async def test_a_cancel_message_cancels_a_request_on_the_socket() -> None:
    worker = GateWorker()
    async with edge(worker) as base, connect(ws_url(base)) as ws:
        await ws.send(json.dumps({"prompt": "x"}))
        processing = await recv(ws)
        with anyio.fail_after(5):
            await worker.wait_started(1)
        await ws.send(json.dumps({"cancel": processing["request_id"]}))
        final = await recv(ws)
        await ws.send(json.dumps({"cancel": "no-such-request"}))
        unknown = await recv(ws)
        await ws.send(json.dumps({"cancel": 7}))
        not_an_id = await recv(ws)
    assert final["request_id"] == processing["request_id"]
    assert final["status"] == "cancelled"
    assert "cancelled" in final["error"]
    assert "'cancel'" in unknown["error"]
    assert not_an_id == unknown


# -- fuzz: random bodies and messages ----------------------------------------------------------

# Every code point, lone surrogates included; half the strings are made mostly of them.
_ANY_CHAR = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, categories=None)
_TEXT = st.one_of(
    st.text(_ANY_CHAR, max_size=20),
    st.lists(st.one_of(_ANY_CHAR, st.characters(categories=["Cs"])), max_size=20).map("".join),
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=12,
)
# Text with no lone surrogate (what a valid field holds), and a few prompts that repeat,
# for the cache and dedup.
_FINE_TEXT = st.text(min_size=1, max_size=20)
_PROMPT = st.one_of(_FINE_TEXT, _FINE_TEXT, st.sampled_from(["hi", "hello there"]), _TEXT, _JSON)
_META_VALUE = st.one_of(st.text(max_size=20), st.integers(), st.floats(), st.booleans(), _JSON)
_METADATA = st.one_of(
    st.dictionaries(st.text(max_size=10), _META_VALUE, max_size=4),
    st.dictionaries(_TEXT, _JSON, max_size=4),
    st.fixed_dictionaries(
        {"priority": st.one_of(st.sampled_from(["high", "LOW", "urgent"]), _JSON)}
    ),
    _JSON,
)
_INFER = st.fixed_dictionaries(
    {"prompt": _PROMPT},
    optional={
        "session_id": st.one_of(_FINE_TEXT, _TEXT, _JSON),
        "metadata": _METADATA,
        "stream": st.one_of(st.booleans(), st.booleans(), _JSON),
        "timeout": st.one_of(
            st.floats(min_value=1e-3, max_value=ECHO.timeout_seconds),
            st.floats(),
            st.integers(),
            _JSON,
        ),
    },
)
_VALID_INFER = st.fixed_dictionaries(  # what a client means to send, in any script
    {"prompt": st.one_of(_FINE_TEXT, st.sampled_from(["hi", "hello there"]))},
    optional={
        "session_id": _FINE_TEXT,
        "metadata": st.dictionaries(
            st.text(max_size=10), st.one_of(st.text(max_size=20), st.integers()), max_size=3
        ),
        "stream": st.booleans(),
        "timeout": st.floats(min_value=1e-3, max_value=ECHO.timeout_seconds),
    },
)
_DOCUMENTS = st.one_of(_JSON, _INFER, _VALID_INFER, _VALID_INFER)


def _utf8(document: object) -> bytes:
    """JSON with non-ASCII text as UTF-8 bytes, lone surrogates as their (invalid) bytes."""
    return json.dumps(document, ensure_ascii=False).encode("utf-8", "surrogatepass")


_DEEP = st.sampled_from([1, 999, 1_001, 10_000, DEEP]).map(nested)
_BODIES = st.one_of(
    _DOCUMENTS.map(lambda d: json.dumps(d).encode()),
    _DOCUMENTS.map(_utf8),
    st.binary(max_size=64),
    _DEEP,
)
_FRAMES = st.one_of(
    _DOCUMENTS.map(json.dumps),  # text frames must be UTF-8: surrogates as escapes
    st.text(max_size=64),
    _DOCUMENTS.map(_utf8),  # bytes frames may be anything
    st.binary(max_size=64),
    _DEEP.map(bytes.decode),
)


@pytest.fixture(scope="module")
def echo_client(echo_server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=echo_server, timeout=10) as client:
        yield client


def _request_id_of(response: httpx.Response) -> str:
    """The request id of a 200 answer, checking that every part of it is JSON."""
    if response.headers["content-type"].startswith("text/event-stream"):
        event("server-sent events")
        events = [block for block in response.text.split("\n\n") if block]
        datas = [json.loads(block.split("\ndata: ", 1)[1]) for block in events]
        assert [block.split("\n", 1)[0] for block in events[-1:]] == ["event: done"]
        assert len({d["request_id"] for d in datas}) == 1
        request_id = datas[0]["request_id"]
    else:
        request_id = response.json()["request_id"]
    assert isinstance(request_id, str)
    return request_id


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(body=_BODIES)
def test_fuzzed_infer_bodies_get_json_and_never_a_5xx(
    echo_client: httpx.Client, body: bytes
) -> None:
    response = echo_client.post(
        "/api/v1/infer", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code < 500, response.text
    event(f"status {response.status_code}")
    if response.status_code != 200:
        assert isinstance(response.json()["error"], str)
        return
    request_id = _request_id_of(response)
    for path in (f"/api/v1/status/{request_id}", f"/api/v1/result/{request_id}"):
        answer = echo_client.get(path)
        assert answer.status_code == 200, (path, answer.text)
        assert answer.json()["request_id"] == request_id


@settings(
    max_examples=75,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(frames=st.lists(_FRAMES, min_size=1, max_size=4))
def test_fuzzed_ws_messages_get_json_frames_and_the_socket_stays_open(
    echo_server: str, frames: list[str | bytes]
) -> None:
    with connect_sync(ws_url(echo_server)) as ws:
        for frame in frames:
            ws.send(frame)
        ws.send(json.dumps({"prompt": "the last word"}))
        answers = 0  # every message gets exactly one first answer: an error or processing
        last_id: str | None = None
        seen: list[dict[str, Any]] = []
        while True:
            received = json.loads(ws.recv(timeout=5))
            assert isinstance(received, dict)
            seen.append(received)
            if "request_id" not in received or received["status"] == "processing":
                answers += 1
                if answers == len(frames) + 1:
                    assert received["status"] == "processing", received
                    last_id = received["request_id"]
            elif received["request_id"] == last_id and received["status"] != "streaming":
                break
    served = sum(1 for f in seen if f.get("status") == "processing") - 1
    event("some random message was served" if served else "every random message was refused")
    assert received["status"] == "completed"
    assert received["result"]
