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
    from starlette.types import Message

pytestmark = pytest.mark.anyio


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
            scope: dict[str, Any] = {
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
