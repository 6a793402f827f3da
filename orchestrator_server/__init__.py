"""The HTTP, WebSocket and SSE face of orchestrator (install the ``server`` extra).

``create_app(handles, config)`` returns a Starlette app; ``start_server(config)`` runs it
with uvicorn; ``python -m orchestrator_server`` (or ``orchestrator-server``) from a shell.
"""

from __future__ import annotations

from orchestrator_server.app import create_app, start_server
from orchestrator_server.config import ServerConfig

__all__ = ["ServerConfig", "create_app", "start_server"]
