"""The drain through a real uvicorn (``build_server``): what clients see between SIGTERM
and exit, and long-polls whose clients leave.

``server.should_exit = True`` is what uvicorn's SIGTERM handler does.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

import anyio
import attrs
import httpx
import pytest

from orchestrator import PipelineClosed, PipelineHandles, RequestStatus, spawn_pipeline
from orchestrator_server import ServerConfig, create_app
from orchestrator_server import app as app_module
from tests.helpers import GateWorker
from tests.server.conftest import serve_edge

if TYPE_CHECKING:
    import socket
    from collections.abc import AsyncIterator

    import uvicorn
    from starlette.applications import Starlette
    from starlette.types import ASGIApp, Receive, Scope, Send

    from orchestrator_server._drain import Drain

pytestmark = pytest.mark.anyio

DRAIN = 0.5
SETTINGS = ServerConfig(access_log=False, drain_seconds=DRAIN)
HEAD = "HTTP/1.1\r\nHost: x\r\n\r\n"  # the rest of a raw GET after its target


class Arrivals:
    """Counts HTTP requests as they reach the app, so a test can wait (on an event) until
    its long-polls are inside the server before it starts the shutdown: uvicorn drops a
    connection whose request has not reached the app yet."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self._changed = asyncio.Event()

    def add_to(self, app: Starlette) -> None:
        app.add_middleware(_Counting, arrivals=self)

    def arrived(self, path: str) -> None:
        self.paths.append(path)
        self._changed.set()

    async def wait(self, path: str, count: int = 1) -> None:
        with anyio.fail_after(5):
            while self.paths.count(path) < count:
                self._changed.clear()
                await self._changed.wait()


class _Counting:
    def __init__(self, app: ASGIApp, arrivals: Arrivals) -> None:
        self.app = app
        self.arrivals = arrivals

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.arrivals.arrived(scope["path"])
        await self.app(scope, receive, send)


@attrs.define
class ShutdownWatch:
    """When the server began shutting down (the drain begins at that moment)."""

    began: asyncio.Event = attrs.Factory(asyncio.Event)
    at: float = 0.0

    @classmethod
    def on(cls, server: uvicorn.Server, monkeypatch: pytest.MonkeyPatch) -> ShutdownWatch:
        watch = cls()
        shutdown = server.shutdown

        async def observed(sockets: list[socket.socket] | None = None) -> None:
            watch.at = anyio.current_time()
            watch.began.set()
            await shutdown(sockets)

        monkeypatch.setattr(server, "shutdown", observed)
        return watch

    async def wait(self) -> None:
        with anyio.fail_after(5):
            await self.began.wait()


@attrs.define
class Served:
    """An app serving a GateWorker's pipeline, borrowed or owned by the app's lifespan."""

    app: Starlette
    worker: GateWorker
    owned: bool
    spawned: list[PipelineHandles]

    @property
    def handles(self) -> PipelineHandles:
        assert len(self.spawned) == 1, "the lifespan has not started"
        return self.spawned[0]


@pytest.fixture(params=["borrowed", "owned"])
async def served(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Served]:
    worker = GateWorker()
    if request.param == "owned":
        # create_app(config=...) builds the pipeline in its lifespan, from the worker
        # make_worker returns: the lifespan owns it and shuts it down in the drain.
        spawned: list[PipelineHandles] = []

        def spawn(*args: Any, **kwargs: Any) -> PipelineHandles:
            spawned.append(spawn_pipeline(*args, **kwargs))
            return spawned[-1]

        monkeypatch.setattr(app_module, "make_worker", lambda *_, **__: worker)
        monkeypatch.setattr(app_module, "spawn_pipeline", spawn)
        yield Served(create_app(config=SETTINGS), worker, True, spawned)
        return
    async with spawn_pipeline(worker) as handles:
        yield Served(create_app(handles, SETTINGS), worker, False, [handles])
        worker.gate.set()  # the pipeline closes at once


async def submit(client: httpx.AsyncClient, prompt: str = "question") -> str:
    answer = await client.post("/api/v1/infer", json={"prompt": prompt})
    assert answer.status_code == 200, answer.text
    request_id: str = answer.json()["request_id"]
    return request_id


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], Any]:
    """One HTTP/1.1 response with a Content-Length: status, headers, JSON body."""
    status_line = await reader.readline()
    assert status_line, "the server closed the connection without answering"
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, json.loads(body)


def address(server: uvicorn.Server) -> tuple[str, int]:
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    return host, port


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_a_long_poll_still_waiting_gets_a_503_at_the_drain_deadline(
    served: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    arrivals = Arrivals()
    arrivals.add_to(served.app)
    async with serve_edge(served.app, SETTINGS) as (base, server):
        watch = ShutdownWatch.on(server, monkeypatch)
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            request_id = await submit(client)
            await served.worker.wait_started(1)
            path = f"/api/v1/result/{request_id}"
            long_poll = asyncio.create_task(client.get(path))
            await arrivals.wait(path)
            server.should_exit = True  # SIGTERM
            await watch.wait()
            with anyio.fail_after(DRAIN + 5):
                answer = await long_poll
            answered_after = anyio.current_time() - watch.at
            ticket = served.handles.get(request_id)
            assert ticket is not None
            status_when_answered = ticket.status
    stopped_after = anyio.current_time() - watch.at

    assert answer.status_code == 503
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["retry-after"] == "1"
    body = answer.json()
    assert body["request_id"] == request_id
    assert body["status"] in ("pending", "processing")
    assert "shutting down" in body["error"]
    # It waited for the drain (requests in flight may still finish), and no longer.
    assert DRAIN <= answered_after < 2 * DRAIN
    assert status_when_answered is RequestStatus.PROCESSING  # answered before any failure
    # One drain: uvicorn's wait for its connections and the pipeline's drain (DRAIN, plus
    # GRACE to fail what is left) run together; one after the other took 2 * DRAIN or more.
    assert stopped_after < 2 * DRAIN
    assert tracebacks(caplog) == []
    ticket = served.handles.get(request_id)
    assert ticket is not None
    if served.owned:  # the lifespan shut its pipeline down: what was left has failed
        assert served.handles.closed
        assert ticket.status is RequestStatus.FAILED
        assert isinstance(ticket.error, PipelineClosed)
    else:  # a borrowed pipeline is its owner's to shut down: the request goes on
        assert not served.handles.closed
        assert ticket.status is RequestStatus.PROCESSING
        assert served.worker.cancelled == 0


async def test_a_request_finishing_during_the_drain_is_answered_and_health_says_so(
    served: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    arrivals = Arrivals()
    arrivals.add_to(served.app)
    async with serve_edge(served.app, SETTINGS) as (base, server):
        watch = ShutdownWatch.on(server, monkeypatch)
        async with httpx.AsyncClient(base_url=base) as client:
            request_id = await submit(client)
        await served.worker.wait_started(1)
        # uvicorn closes its listener and every idle connection the moment it begins to
        # shut down, so the only /health a client can reach during the drain is one queued
        # (pipelined) behind a request in flight on the same connection.
        reader, writer = await asyncio.open_connection(*address(server))
        path = f"/api/v1/result/{request_id}"
        writer.write(f"GET {path} {HEAD}GET /health {HEAD}".encode())
        await arrivals.wait(path)
        server.should_exit = True  # SIGTERM
        await watch.wait()
        drain: Drain = served.app.state.drain
        assert drain.begun
        with pytest.raises(httpx.ConnectError):  # no new connections
            async with httpx.AsyncClient(base_url=base) as client:
                await client.get("/health")
        served.worker.gate.set()  # the request finishes during the drain
        with anyio.fail_after(5):
            status, _, result = await read_response(reader)
            health_status, _, health = await read_response(reader)
            assert await reader.read() == b""  # then the server closes the connection
        writer.close()
        answered_after = anyio.current_time() - watch.at
    stopped_after = anyio.current_time() - watch.at

    assert (status, result["status"], result["request_id"]) == (200, "completed", request_id)
    assert answered_after < DRAIN  # both, without waiting out the drain
    assert (health_status, health["status"]) == (503, "shutting_down")
    assert stopped_after < DRAIN  # nothing left to wait for
    assert tracebacks(caplog) == []


async def test_abandoned_long_polls_end_with_their_connections() -> None:
    clients = 100
    worker = GateWorker()
    async with spawn_pipeline(worker) as handles:
        app = create_app(handles, SETTINGS)
        arrivals = Arrivals()
        arrivals.add_to(app)
        async with serve_edge(app, SETTINGS) as (base, server):
            try:
                async with httpx.AsyncClient(base_url=base) as client:
                    request_id = await submit(client)
                await worker.wait_started(1)
                path = f"/api/v1/result/{request_id}"
                connections = []
                for _ in range(clients):
                    reader, writer = await asyncio.open_connection(*address(server))
                    writer.write(f"GET {path}?timeout=300 {HEAD}".encode())
                    connections.append((reader, writer))
                await arrivals.wait(path, clients)
                assert len(server.server_state.tasks) == clients
                for _, writer in connections:
                    writer.close()
                with anyio.fail_after(5):  # long before the 300 s they asked to wait
                    for _, writer in connections:
                        await writer.wait_closed()
                    # uvicorn signals nothing when a request task ends: poll its task set.
                    while server.server_state.tasks:
                        await anyio.sleep(0.01)
                ticket = handles.get(request_id)
                assert ticket is not None
                # A long-poll leaving frees what it held, and never cancels the request.
                assert ticket.status is RequestStatus.PROCESSING
                assert worker.cancelled == 0
            finally:
                worker.gate.set()  # the server and the pipeline stop at once
