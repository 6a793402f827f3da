"""Build a worker by name, for the standalone server and its ``--worker`` flag.

Each reads its settings from the environment, like the official SDKs: keys and URLs as the
worker classes document, plus the model: ``OPENAI_MODEL`` (default ``gpt-4o-mini``),
``ANTHROPIC_MODEL`` (default ``claude-3-5-haiku-latest``), ``VLLM_MODEL`` (required: the
model your vLLM server serves). ``llama_cpp`` needs ``LLAMA_CPP_URL``: the worker's own
default, ``http://localhost:8080``, is this server's default address.
"""

from __future__ import annotations

import ipaddress
import os
from typing import TYPE_CHECKING

import httpx

from orchestrator import EchoWorker, ModelWorker
from orchestrator.workers.vllm import VLLM_URL

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["WORKERS", "make_worker"]


def _env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name) or default
    if value is None:
        raise ValueError(f"{name} is not set")
    return value


def _openai() -> ModelWorker:
    from orchestrator.workers import OpenAiWorker

    return OpenAiWorker(model=_env("OPENAI_MODEL", "gpt-4o-mini"))


def _anthropic() -> ModelWorker:
    from orchestrator.workers import AnthropicWorker

    return AnthropicWorker(model=_env("ANTHROPIC_MODEL", "claude-3-5-haiku-latest"))


def _llama_cpp() -> ModelWorker:
    from orchestrator.workers import LlamaCppWorker

    try:
        url = _env("LLAMA_CPP_URL")
    except ValueError:
        raise ValueError(
            "LLAMA_CPP_URL is not set: point it at your llama-server, e.g. "
            "LLAMA_CPP_URL=http://127.0.0.1:8081 (this server listens on 8080 by default)"
        ) from None
    return LlamaCppWorker(url=url)


def _vllm() -> ModelWorker:
    from orchestrator.workers import VllmWorker

    try:
        model = _env("VLLM_MODEL")
    except ValueError:
        raise ValueError("VLLM_MODEL is not set: name the model your vLLM server serves") from None
    return VllmWorker(model=model)


WORKERS: dict[str, Callable[[], ModelWorker]] = {
    "echo": EchoWorker,
    "openai": _openai,
    "anthropic": _anthropic,
    "llama_cpp": _llama_cpp,
    "vllm": _vllm,
}
"""Names accepted by ``--worker`` and ``ORCHESTRATOR_WORKER``."""


def make_worker(name: str, *, server_address: tuple[str, int] | None = None) -> ModelWorker:
    """A worker configured from the environment (keys, URLs, models).

    Args:
        name: One of ``WORKERS``.
        server_address: The ``(host, port)`` this server listens on: a worker URL that
            points there is refused, as the server would call itself (port 0: no check).

    Raises:
        ValueError: ``name`` is not one of ``WORKERS``, a setting it needs is missing
            or unusable, or its URL points at ``server_address`` (the message says which).
    """
    build = WORKERS.get(name)
    if build is None:
        raise ValueError(f"unknown worker {name!r}: choose one of {', '.join(WORKERS)}")
    if server_address is not None:
        _check_not_self(name, server_address)
    return build()


# The variable naming the server each worker calls, and the URL used when it is unset
# (None: a public API, or no default at all).
_URL_SETTINGS: dict[str, tuple[str, str | None]] = {
    "openai": ("OPENAI_BASE_URL", None),
    "anthropic": ("ANTHROPIC_BASE_URL", None),
    "llama_cpp": ("LLAMA_CPP_URL", None),
    "vllm": ("VLLM_URL", VLLM_URL),
}


def _check_not_self(name: str, server_address: tuple[str, int]) -> None:
    """Refuse (``ValueError``) the URL worker ``name`` calls if it is ``server_address``."""
    host, port = server_address
    if name not in _URL_SETTINGS or port == 0:  # port 0: the system picks one
        return
    variable, default = _URL_SETTINGS[name]
    url = os.environ.get(variable) or default
    if url is None:
        return
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return  # the worker refuses it, saying why
    default_port = 443 if parsed.scheme == "https" else 80
    if not parsed.host or (parsed.port or default_port) != port:
        return
    target, bind = parsed.host.lower(), host.strip("[]").lower()
    if target == bind or (_is_local(target) and _is_local(bind)):
        # Only host and port are quoted: the URL may hold a password the worker refuses.
        where = variable if os.environ.get(variable) else f"{variable} (unset, so {url})"
        raise ValueError(
            f"{where} points at this server itself ({parsed.host}:{port}): set {variable} "
            "to the model server's URL, or serve on another --port"
        )


def _is_local(host: str) -> bool:
    """Whether ``host`` names this machine's loopback or every interface (0.0.0.0)."""
    if host in ("", "localhost") or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback or address.is_unspecified
