"""Serve an app with uvicorn on a real loopback port, inside the test's event loop."""

from __future__ import annotations

import asyncio
import json
import socket
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import attrs
import pytest
import uvicorn

from orchestrator_server.app import build_server
from tests.workers.conftest import PROVIDER_ENV

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from starlette.applications import Starlette
    from websockets.asyncio.client import ClientConnection

    from orchestrator_server import ServerConfig


def _listening_socket() -> socket.socket:
    # The protocol named: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
    # and without it each response after a connection's first waits ~40 ms for an ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


@asynccontextmanager
async def serve(app: Starlette) -> AsyncIterator[str]:
    """Yield ``http://127.0.0.1:<port>`` while uvicorn serves ``app`` there.

    The socket is bound and listening before uvicorn starts, so clients may connect at
    once (they wait in the backlog until startup completes): nothing to poll.
    """
    sock = _listening_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@asynccontextmanager
async def serve_edge(
    app: Starlette, settings: ServerConfig
) -> AsyncIterator[tuple[str, uvicorn.Server]]:
    """Like ``serve``, but with the server ``start_server`` runs (``build_server``: the
    edge protocol, its timeouts, the drain); yields the base URL and the server, whose
    ``should_exit = True`` is what SIGTERM does. The server has stopped on exit."""
    sock = _listening_socket()
    port = sock.getsockname()[1]
    server = build_server(app, attrs.evolve(settings, host="127.0.0.1", port=port))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture
def worker_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No provider or server setting of the developer's own reaches the test: it sets them."""
    for name in (*PROVIDER_ENV, "ORCHESTRATOR_WORKER", "SERVER_HOST", "SERVER_PORT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def ws_url(base: str) -> str:
    """The WebSocket route's URL on the server at ``base``."""
    return base.replace("http://", "ws://") + "/api/v1/stream"


async def recv(ws: ClientConnection) -> dict[str, Any]:
    """The next frame, a JSON object, within 5 s."""
    with anyio.fail_after(5):
        frame = json.loads(await ws.recv())
    assert isinstance(frame, dict)
    return frame
