"""The HTTP, WebSocket and SSE face of orchestrator (install the ``server`` extra).

``create_app(handles, config)`` returns a Starlette app; ``start_server(config)`` runs it
with uvicorn; ``run_server(config)`` does so in the foreground until SIGINT/SIGTERM;
``python -m orchestrator_server`` (or ``orchestrator-server``) from a shell.

The names load on first use, so that without the ``server`` extra the error says which
extra to install instead of naming a module the user never asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator_server.app import create_app, run_server, start_server
    from orchestrator_server.config import ServerConfig

__all__ = ["ServerConfig", "create_app", "run_server", "start_server"]

_HOME = {
    "ServerConfig": "orchestrator_server.config",
    "create_app": "orchestrator_server.app",
    "run_server": "orchestrator_server.app",
    "start_server": "orchestrator_server.app",
}
_EXTRA = ("starlette", "uvicorn")


def require_server_extra() -> None:
    """Import what the server needs, or explain which extra brings it.

    Raises:
        ModuleNotFoundError: starlette or uvicorn is missing; the message says to
            ``pip install 'prompt-orchestrator[server]'``.
    """
    for name in _EXTRA:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            raise ModuleNotFoundError(
                f"orchestrator_server needs {name}, which the server extra installs: "
                "pip install 'prompt-orchestrator[server]'",
                name=name,
            ) from None


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'orchestrator_server' has no attribute {name!r}")
    require_server_extra()
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
