"""``WS /api/v1/stream``: several requests in flight on one socket, tokens on request.

Client -> server: ``{"prompt", "session_id"?, "metadata"?, "stream"?, "timeout"?}``, or
``{"cancel": "<request_id>"}`` for a request sent on this socket.
Server -> client: ``{"request_id", "status": "processing"}``, then (with ``"stream": true``)
``{"request_id", "status": "streaming", "token"}`` frames, then ``{"request_id",
"status": "completed", "result"}`` or ``{"request_id", "status": <failed|timeout|cancelled>,
"error"}``. Bad input gets ``{"error": "..."}`` and the socket stays open.

Frames go out through a bounded outbox drained by one sender task: the pipeline never waits
on a client. A request's tokens that are waiting together are queued in one step and sent
back to back (one frame each: the shape is one token per frame), a lone token at once. The
connection's task group owns the sender and one follower per request, so none outlives the
connection. A client that stops reading (the outbox full, or the frames waiting for it not
accepted within ``ws_send_timeout``) is disconnected and its requests are cancelled; so are
the requests of a client that disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from starlette.websockets import WebSocket, WebSocketDisconnect

from orchestrator import OrchestratorError, RateLimited, Ticket
from orchestrator_server._json import quote
from orchestrator_server.routes import (
    BadRequest,
    config_of,
    handles_of,
    parse_infer,
    parse_json,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["stream_endpoint"]

logger = logging.getLogger("orchestrator_server.websocket")

_OUTBOX_FRAMES = 1024
_SLOW_CLIENT = 1008  # policy violation
_INTERNAL_ERROR = 1011


class _Connection:
    """One socket: its outbox, its requests, and the task group that owns its sender and
    the followers of its requests (so none outlives the connection)."""

    def __init__(self, websocket: WebSocket, tg: anyio.abc.TaskGroup) -> None:
        self.websocket = websocket
        self.tg = tg
        self.config = config_of(websocket)
        self.handles = handles_of(websocket)
        self.outbox: deque[str] = deque()  # frames, as text
        self.pending = asyncio.Event()  # set when the outbox has frames
        self.tickets: dict[str, Ticket] = {}
        client = websocket.client
        self.default_session = f"ip:{client.host}" if client else "anonymous"
        self.too_slow = False

    def emit(self, frame: dict[str, Any]) -> None:
        """Queue a frame; a client so far behind that the outbox is full is dropped."""
        self.emit_texts((json.dumps(frame),))

    def emit_texts(self, frames: Sequence[str]) -> None:
        """Queue frames already written as JSON text, in order."""
        if self.too_slow:
            return
        if len(self.outbox) + len(frames) > _OUTBOX_FRAMES:
            self.too_slow = True
            self.tg.cancel_scope.cancel()
            return
        self.outbox.extend(frames)
        self.pending.set()

    async def sender(self) -> None:
        """Send the queued frames; frames the client does not accept within
        ``ws_send_timeout`` of their turn to go (those waiting together share one timer)
        mark it too slow and end the connection."""
        send, timeout = self.websocket.send_text, self.config.ws_send_timeout
        outbox, pending = self.outbox, self.pending
        while True:
            await pending.wait()
            pending.clear()
            while outbox:
                # One timer for the frames waiting now; frames queued meanwhile get their own.
                with anyio.move_on_after(timeout) as scope:
                    for _ in range(len(outbox)):
                        await send(outbox.popleft())
                if scope.cancelled_caught:
                    self.too_slow = True
                    self.tg.cancel_scope.cancel()
                    return

    async def handle(self, text: str) -> None:
        if len(text.encode()) > self.config.max_ws_message_size:
            self.emit({"error": f"message is larger than {self.config.max_ws_message_size} bytes"})
            return
        try:
            payload = parse_json(text)
            if isinstance(payload, dict) and "cancel" in payload:
                self.cancel(payload["cancel"])
                return
            request, stream = parse_infer(
                payload, self.default_session, self.config.timeout_seconds
            )
        except BadRequest as exc:
            self.emit({"error": str(exc).replace("the body", "the message")})
            return
        try:
            ticket = await self.handles.submit(request, stream=stream)
        except RateLimited as exc:
            self.emit({"error": str(exc), "retry_after": exc.retry_after})
            return
        except OrchestratorError as exc:
            self.emit({"error": str(exc)})
            return
        self.tickets[ticket.request_id] = ticket
        self.emit({"request_id": ticket.request_id, "status": "processing"})
        self.tg.start_soon(self.follow, ticket, stream)

    def cancel(self, request_id: object) -> None:
        """Cancel a request sent on this socket; its final frame says ``cancelled``."""
        ticket = self.tickets.get(request_id) if isinstance(request_id, str) else None
        if ticket is None:
            self.emit({"error": "'cancel' must be the request_id of a request on this socket"})
            return
        ticket.cancel_nowait()

    async def follow(self, ticket: Ticket, stream: bool) -> None:
        """Relay a request's tokens (if asked) and its final frame. Cancelled with the
        connection, it leaves the ticket listed, for ``abandon`` to cancel."""
        request_id = ticket.request_id
        if stream:
            # The frames as json.dumps writes them, around a head written once.
            head = f'{{"request_id": {quote(request_id)}, "status": "streaming", "token": '
            try:
                async for batch in ticket.token_batches():
                    self.emit_texts([f"{head}{quote(token)}}}" for token in batch])
            except OrchestratorError:
                pass  # reported in the final frame
        await ticket.wait()
        self.tickets.pop(request_id, None)
        frame: dict[str, Any] = {"request_id": request_id, "status": ticket.status.value}
        if ticket.error is None:
            frame["result"] = ticket.text
        else:
            frame["error"] = str(ticket.error)
        self.emit(frame)

    def abandon(self) -> None:
        """The connection is over: its requests nobody will read are cancelled."""
        for ticket in list(self.tickets.values()):
            ticket.cancel_nowait()


async def stream_endpoint(websocket: WebSocket) -> None:
    """Serve one WebSocket connection until the client leaves or is too slow."""
    await websocket.accept()
    connection: _Connection | None = None
    failure: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            connection = _Connection(websocket, tg)
            tg.start_soon(connection.sender)
            await _receive_loop(connection)
            tg.cancel_scope.cancel()  # the client left: the sender and followers stop
    except Exception as exc:  # a bug: log it, tell the client, no trace
        failure = exc
    finally:
        if connection is not None:
            connection.abandon()
    if connection is not None and connection.too_slow:
        logger.warning("disconnecting a WebSocket client that does not read its frames")
        with contextlib.suppress(RuntimeError, OSError):
            await websocket.close(_SLOW_CLIENT, "client too slow")
    elif failure is not None:
        logger.error("WebSocket handler failed", exc_info=failure)
        with contextlib.suppress(RuntimeError, OSError):
            await websocket.close(_INTERNAL_ERROR, "internal server error")


async def _receive_loop(connection: _Connection) -> None:
    websocket = connection.websocket
    while True:
        try:
            message = await websocket.receive()
        except WebSocketDisconnect:
            return
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is None:
            data = message.get("bytes") or b""
            try:
                text = data.decode()
            except UnicodeDecodeError:
                connection.emit({"error": "message is not valid UTF-8 JSON"})
                continue
        await connection.handle(text)
