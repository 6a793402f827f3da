"""REST and SSE routes in process (httpx's ASGI transport), every error code included."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest

from orchestrator import (
    EchoWorker,
    InvalidRequest,
    PipelineConfig,
    PipelineHandles,
    PromptRequest,
    RateLimited,
    spawn_pipeline,
)
from orchestrator_server import ServerConfig, create_app
from orchestrator_server.routes import BadRequest
from tests.helpers import GateWorker, prompt_for

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Mapping

    from starlette.types import ASGIApp, Receive, Scope, Send

    from orchestrator.workers.base import ModelWorker

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def client_for(
    worker: ModelWorker | None = None,
    pipeline: PipelineConfig | None = None,
    config: ServerConfig | None = None,
) -> AsyncIterator[tuple[httpx.AsyncClient, PipelineHandles]]:
    async with spawn_pipeline(worker or EchoWorker.with_delay(0), pipeline) as handles:
        app = create_app(handles, config or ServerConfig(access_log=False))
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app) as state,
            httpx.AsyncClient(transport=transport, base_url="http://test") as client,
        ):
            transport.app = _with_state(app, state)
            yield client, handles


def _with_state(app: ASGIApp, state: Mapping[str, object] | None) -> ASGIApp:
    """What a server does after the lifespan: hand its state to every request."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        scope["state"] = dict(state or {})
        await app(scope, receive, send)

    return asgi


async def test_submit_then_result_then_status() -> None:
    async with client_for() as (client, _):
        response = await client.post(
            "/api/v1/infer",
            json={
                "prompt": "What is the capital of France?",
                "session_id": "user-123",
                "metadata": {"priority": "high", "category": "chat"},
            },
        )
        assert response.status_code == 200
        body = response.json()
        assert set(body) == {"request_id", "status", "result", "error"}
        assert body["status"] in {"pending", "processing", "completed"}
        request_id = body["request_id"]
        result = (await client.get(f"/api/v1/result/{request_id}")).json()
        assert result == {
            "request_id": request_id,
            "status": "completed",
            "result": prompt_for("What is the capital of France?"),
            "error": None,
        }
        assert (await client.get(f"/api/v1/status/{request_id}")).json() == result


async def test_failed_request_reports_its_error() -> None:
    worker = GateWorker(open_=True)
    worker.fail_with = RuntimeError("model exploded")
    async with client_for(worker) as (client, _):
        request_id = (await client.post("/api/v1/infer", json={"prompt": "x"})).json()["request_id"]
        body = (await client.get(f"/api/v1/result/{request_id}")).json()
    assert body["status"] == "failed"
    assert "model exploded" in body["error"]
    assert body["result"] is None


async def test_result_waits_only_as_long_as_asked() -> None:
    worker = GateWorker()
    async with client_for(worker) as (client, _):
        request_id = (await client.post("/api/v1/infer", json={"prompt": "x"})).json()["request_id"]
        body = (await client.get(f"/api/v1/result/{request_id}?timeout=0")).json()
        assert body["status"] in {"pending", "processing"}
        waiting = asyncio.create_task(client.get(f"/api/v1/result/{request_id}?timeout=30"))
        await worker.wait_started(1)
        await anyio.wait_all_tasks_blocked()
        assert not waiting.done()
        worker.gate.set()
        assert (await waiting).json()["status"] == "completed"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"session_id": "u"}', "'prompt'"),
        (b'{"prompt": "   "}', "'prompt'"),
        (b'{"prompt": "x", "session_id": 5}', "'session_id'"),
        (b'{"prompt": "x", "metadata": "high"}', "'metadata'"),
        (b'{"prompt": "x", "metadata": {"a": {"b": 1}}}', "metadata.a"),
        (b'{"prompt": "x", "metadata": {"priority": "urgent"}}', "unknown priority"),
        (b'{"prompt": "x", "stream": "yes"}', "'stream'"),
    ],
)
async def test_bad_input_is_a_400_with_a_reason(body: bytes, message: str) -> None:
    async with client_for() as (client, handles):
        response = await client.post(
            "/api/v1/infer", content=body, headers={"content-type": "application/json"}
        )
        assert handles.in_flight == 0
    assert response.status_code == 400
    assert message in response.json()["error"]


async def test_body_over_the_limit_is_413_by_declared_length() -> None:
    config = ServerConfig(max_request_size=100, access_log=False)
    async with client_for(config=config) as (client, _):
        response = await client.post("/api/v1/infer", json={"prompt": "x" * 200})
    assert response.status_code == 413
    assert "larger than 100 bytes" in response.json()["error"]


async def test_body_over_the_limit_is_413_while_streaming_without_length() -> None:
    config = ServerConfig(max_request_size=1000, access_log=False)
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"prompt": "'
        for _ in range(1000):
            sent += 1
            yield b"x" * 100

    async with client_for(config=config) as (client, _):
        response = await client.post(
            "/api/v1/infer", content=chunks(), headers={"content-type": "application/json"}
        )
    assert response.status_code == 413
    assert sent < 1000  # refused before the whole body was read


async def test_unknown_ids_routes_and_methods() -> None:
    async with client_for() as (client, _):
        missing = await client.get("/api/v1/status/does-not-exist")
        assert (missing.status_code, missing.json()) == (404, {"error": "unknown request id"})
        assert (await client.get("/api/v1/result/does-not-exist")).status_code == 404
        assert (await client.get("/nowhere")).status_code == 404
        wrong = await client.get("/api/v1/infer")
        assert wrong.status_code == 405
        assert wrong.json() == {"error": "Method Not Allowed"}


async def test_bad_timeout_query_is_400() -> None:
    async with client_for() as (client, _):
        request_id = (await client.post("/api/v1/infer", json={"prompt": "x"})).json()["request_id"]
        for bad in ("abc", "-1", "inf", "nan"):
            response = await client.get(f"/api/v1/result/{request_id}?timeout={bad}")
            assert response.status_code == 400, bad


async def test_overload_is_503_with_retry_after() -> None:
    worker = GateWorker()
    pipeline = PipelineConfig(
        rag_capacity=1, assemble_capacity=1, inference_capacity=1, max_concurrency=1
    )
    async with client_for(worker, pipeline) as (client, _):
        codes = []
        for i in range(10):
            response = await client.post("/api/v1/infer", json={"prompt": f"r{i}"})
            codes.append(response.status_code)
            await anyio.wait_all_tasks_blocked()
        worker.gate.set()
    assert codes.count(200) == 6  # one in the worker, one waiting in each channel or stage
    assert codes[6:] == [503] * 4
    assert response.headers["retry-after"].isdigit()
    assert "capacity" in response.json()["error"]


async def test_shutting_down_is_503() -> None:
    async with client_for() as (client, handles):
        await handles.shutdown()
        response = await client.post("/api/v1/infer", json={"prompt": "x"})
        health = await client.get("/health")
    assert response.status_code == 503
    assert response.json() == {"error": "the server is shutting down"}
    assert health.status_code == 503


@asynccontextmanager
async def client_raising(error: Exception) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app whose pipeline's ``submit`` raises ``error``."""

    class Raising:
        closed = False

        async def submit(self, request: PromptRequest, *, stream: bool = False) -> None:
            raise error

    app = create_app(Raising(), ServerConfig(access_log=False))  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app) as state:
        transport.app = _with_state(app, state)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client


@pytest.mark.parametrize(
    "error",
    [RuntimeError("secret internals /etc/passwd"), ValueError("secret internals /etc/passwd")],
    ids=["RuntimeError", "ValueError"],
)
async def test_unexpected_errors_are_a_json_500_without_a_trace(error: Exception) -> None:
    async with client_raising(error) as client:
        response = await client.post("/api/v1/infer", json={"prompt": "x"})
    assert response.status_code == 500  # a ValueError from a bug is no client's fault
    assert response.json() == {"error": "internal server error"}
    assert "secret" not in response.text
    assert response.headers["x-request-id"]


async def test_the_library_refusing_a_request_is_a_400_with_its_reason() -> None:
    async with client_raising(InvalidRequest("request id 'r1' is already in use")) as client:
        response = await client.post("/api/v1/infer", json={"prompt": "x"})
    assert response.status_code == 400
    assert response.json() == {"error": "request id 'r1' is already in use"}


@pytest.mark.parametrize(
    ("retry_after", "reset_in", "retry_header", "reset_header"),
    [(20.0, 60.0, "20", "60"), (0.2, 40.01, "1", "41"), (0.0, 0.0, "1", "0")],
)
async def test_rate_limited_headers_round_up_the_retry_hint_and_the_full_reset(
    retry_after: float, reset_in: float, retry_header: str, reset_header: str
) -> None:
    limited = RateLimited("u1", limit=3, remaining=0, retry_after=retry_after, reset_in=reset_in)
    async with client_raising(limited) as client:
        response = await client.post("/api/v1/infer", json={"prompt": "x"})
    assert response.status_code == 429
    assert response.headers["retry-after"] == retry_header  # whole seconds, at least 1
    assert response.headers["x-ratelimit-reset"] == reset_header  # until the bucket is full
    assert response.headers["x-ratelimit-limit"] == "3"
    assert response.headers["x-ratelimit-remaining"] == "0"


def test_bad_request_is_the_library_s_invalid_request() -> None:
    assert issubclass(BadRequest, InvalidRequest)
    assert issubclass(BadRequest, ValueError)  # what callers caught before


async def test_request_id_header_is_honoured_when_sane() -> None:
    async with client_for() as (client, _):
        mine = await client.get("/health", headers={"X-Request-ID": "trace-42.a:b"})
        insane = await client.get("/health", headers={"X-Request-ID": "a b\tc" + "x" * 300})
        none = await client.get("/health")
        again = await client.get("/health")
    assert mine.headers["x-request-id"] == "trace-42.a:b"
    assert insane.headers["x-request-id"] != "a b\tc" + "x" * 300
    assert none.headers["x-request-id"] != again.headers["x-request-id"]
    assert none.headers["vary"] == "Origin"


async def test_health_and_metrics() -> None:
    async with client_for() as (client, _):
        await client.post("/api/v1/infer", json={"prompt": "x"})
        health = await client.get("/health")
        scraped = await client.get("/metrics")
    assert health.json() == {"status": "healthy", "version": "0.1.0"}
    assert scraped.headers["content-type"].startswith("text/plain")
    assert "orchestrator_requests_total" in scraped.text


async def test_cors_is_permissive_by_default_and_configurable() -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    async with client_for() as (client, _):
        open_ = await client.options("/api/v1/infer", headers=preflight)
    config = ServerConfig(cors_origins="https://ok.example", access_log=False)
    async with client_for(config=config) as (client, _):
        denied = await client.options("/api/v1/infer", headers=preflight)
        allowed = await client.options(
            "/api/v1/infer", headers={**preflight, "Origin": "https://ok.example"}
        )
    assert open_.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-origin" not in denied.headers
    assert allowed.headers["access-control-allow-origin"] == "https://ok.example"


def _events(text: str) -> list[tuple[str, dict[str, object]]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


async def test_sse_streams_tokens_then_the_result() -> None:
    async with client_for(pipeline=PipelineConfig(template="{input}")) as (client, _):
        response = await client.post(
            "/api/v1/infer", json={"prompt": "one two three", "stream": True}
        )
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _events(response.text)
    assert [name for name, _ in events] == ["request", "token", "token", "token", "done"]
    tokens = [data["token"] for name, data in events if name == "token"]
    assert tokens == ["one", " two", " three"]
    done = events[-1][1]
    assert done["status"] == "completed"
    assert done["result"] == "one two three"
    assert done["request_id"] == events[0][1]["request_id"]


async def _sse_writes(
    worker: ModelWorker, prompt: str, on_write: Callable[[bytes], object]
) -> list[bytes]:
    """POST ``prompt`` with ``"stream": true`` straight to the app (ASGI, so each write the
    route makes is seen as it made it) and return the bodies of its writes."""
    writes: list[bytes] = []
    body = json.dumps({"prompt": prompt, "stream": True}).encode()
    scope: dict[str, object] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/v1/infer",
        "raw_path": b"/api/v1/infer",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80),
    }
    received = False

    async def receive() -> dict[str, object]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": body, "more_body": False}
        await anyio.sleep_forever()  # the client stays to the end
        raise AssertionError  # pragma: no cover

    async def send(message: Mapping[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            writes.append(message["body"])
            on_write(message["body"])

    config = PipelineConfig(template="{input}")
    async with spawn_pipeline(worker, config) as handles:
        app = create_app(handles, ServerConfig(access_log=False))
        async with app.router.lifespan_context(app) as state:
            await _with_state(app, state)(scope, receive, send)
    return writes


async def test_sse_sends_the_tokens_waiting_together_in_one_write() -> None:
    prompt = " ".join(f"w{i}" for i in range(100))
    with anyio.fail_after(10):
        writes = await _sse_writes(EchoWorker.with_delay(0), prompt, lambda _: None)
    events = _events(b"".join(writes).decode())
    assert [data["token"] for name, data in events if name == "token"] == [
        f" w{i}" if i else "w0" for i in range(100)
    ]
    assert events[-1][1]["result"] == prompt
    assert len(writes) == 3  # the request event, all 100 tokens, the done event


async def test_sse_sends_a_lone_token_at_once() -> None:
    worker = GateWorker(open_=True)
    worker.token_gates = [asyncio.Event() for _ in range(3)]
    written = asyncio.Event()

    def on_write(_: bytes) -> None:
        written.set()

    async def release_one_by_one() -> None:
        for gate in worker.token_gates or ():
            await written.wait()  # the previous write went out: the stream is not held
            written.clear()
            gate.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(release_one_by_one)
            writes = await _sse_writes(worker, "one two three", on_write)
    tokens = [_events(w.decode()) for w in writes[1:-1]]
    assert [[data["token"] for _, data in events] for events in tokens] == [
        ["one"],
        [" two"],
        [" three"],
    ]


async def test_sse_reports_a_failure_in_the_final_event() -> None:
    worker = GateWorker(open_=True)
    worker.fail_with = RuntimeError("boom")
    async with client_for(worker) as (client, _):
        response = await client.post("/api/v1/infer", json={"prompt": "x", "stream": True})
    name, done = _events(response.text)[-1]
    assert name == "done"
    assert done["status"] == "failed"
    assert "boom" in str(done["error"])
