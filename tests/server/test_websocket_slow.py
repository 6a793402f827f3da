"""A WebSocket client that stops reading is dropped; the pipeline never waits for it."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from orchestrator import RequestStatus, spawn_pipeline
from orchestrator_server import ServerConfig, create_app
from tests.helpers import GateWorker, prompt_for

if TYPE_CHECKING:
    from collections.abc import Mapping

    from starlette.types import Message

pytestmark = pytest.mark.anyio


def ws_scope(state: Mapping[str, Any] | None) -> dict[str, Any]:
    """An ASGI WebSocket scope for ``/api/v1/stream`` carrying the lifespan's state."""
    return {
        "type": "websocket",
        "path": "/api/v1/stream",
        "raw_path": b"/api/v1/stream",
        "query_string": b"",
        "headers": [],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80),
        "scheme": "ws",
        "root_path": "",
        "subprotocols": [],
        "state": dict(state or {}),
    }


async def test_a_client_that_does_not_read_is_closed_and_its_requests_cancelled() -> None:
    worker = GateWorker()
    config = ServerConfig(access_log=False, ws_send_timeout=0.05)
    incoming: asyncio.Queue[Message] = asyncio.Queue()
    sent: list[Message] = []
    stuck = asyncio.Event()  # never set: the client's socket buffer is full

    async def receive() -> Message:
        return await incoming.get()

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "websocket.send":
            await stuck.wait()

    async with spawn_pipeline(worker) as handles:
        app = create_app(handles, config)
        async with app.router.lifespan_context(app) as state:
            scope = ws_scope(state)
            incoming.put_nowait({"type": "websocket.connect"})
            incoming.put_nowait({"type": "websocket.receive", "text": json.dumps({"prompt": "a"})})
            with anyio.fail_after(5):
                await app(scope, receive, send)  # returns once the client is dropped
            closes = [m for m in sent if m["type"] == "websocket.close"]
            assert closes == [
                {"type": "websocket.close", "code": 1008, "reason": "client too slow"}
            ]
            frame = json.loads(next(m["text"] for m in sent if m["type"] == "websocket.send"))
            ticket = handles.get(frame["request_id"])
            assert ticket is not None
            assert ticket.status is RequestStatus.CANCELLED
            worker.gate.set()
            assert await handles.infer("b") == prompt_for("b")  # the pipeline kept serving


async def test_an_unexpected_error_closes_the_socket_with_1011_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken:
        closed = False

        async def submit(self, request: object, *, stream: bool = False) -> None:
            raise RuntimeError("a bug in the server")

    app = create_app(Broken(), ServerConfig(access_log=False))  # type: ignore[arg-type]
    incoming: asyncio.Queue[Message] = asyncio.Queue()
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async with app.router.lifespan_context(app) as state:
        scope = ws_scope(state)
        incoming.put_nowait({"type": "websocket.connect"})
        incoming.put_nowait({"type": "websocket.receive", "text": json.dumps({"prompt": "a"})})
        with anyio.fail_after(5):
            await app(scope, incoming.get, send)
    assert sent[-1] == {"type": "websocket.close", "code": 1011, "reason": "internal server error"}
    assert "a bug in the server" not in json.dumps(
        [m for m in sent if m["type"] != "websocket.close"]
    )
    assert any("WebSocket handler failed" in r.message for r in caplog.records)
