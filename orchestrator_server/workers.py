"""Build the server's worker (``--worker``): by name or import path, as
``orchestrator.workers._named.build_worker`` does, refusing a worker URL that points at
this very server."""

from __future__ import annotations

import ipaddress
import os
from typing import TYPE_CHECKING

import httpx

from orchestrator.workers._named import WORKERS, build_worker
from orchestrator.workers.vllm import VLLM_URL

if TYPE_CHECKING:
    from orchestrator import ModelWorker

__all__ = ["WORKERS", "make_worker"]


def make_worker(name: str, *, server_address: tuple[str, int] | None = None) -> ModelWorker:
    """A worker configured from the environment (keys, URLs, models).

    Args:
        name: One of ``WORKERS``, or ``package.module:factory``.
        server_address: The ``(host, port)`` this server listens on: a worker URL that
            points there is refused, as the server would call itself (port 0: no check).

    Raises:
        ValueError: ``name`` names no worker, a setting it needs is missing
            or unusable, or its URL points at ``server_address`` (the message says which).
    """
    if server_address is not None:
        _check_not_self(name, server_address)
    return build_worker(name)


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
