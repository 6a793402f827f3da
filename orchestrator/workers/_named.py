"""Workers by name, or by import path (``package.module:factory``), from the environment.

For the command lines (``orchestrator-server --worker``, ``orchestrator-worker --worker``).
Each named worker reads its settings from the environment, like the official SDKs: keys and
URLs as the worker classes document, plus the model: ``OPENAI_MODEL`` (default
``gpt-4o-mini``), ``ANTHROPIC_MODEL`` (default ``claude-3-5-haiku-latest``), ``VLLM_MODEL``
(required: the model your vLLM server serves). ``llama_cpp`` needs ``LLAMA_CPP_URL``: the
worker's own default, ``http://localhost:8080``, is the server's default address. An
import path names a callable that takes no argument and returns a ``ModelWorker``, the way
uvicorn takes ``module:app``.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

from orchestrator.workers.base import EchoWorker, ModelWorker

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["WORKERS", "build_worker"]


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


def build_worker(spec: str) -> ModelWorker:
    """The worker ``spec`` names: one of ``WORKERS``, or ``package.module:factory``.

    Raises:
        ValueError: An unknown name, a setting the worker needs missing or unusable, or an
            import path that does not import, does not name a callable, or whose factory
            does not return a ``ModelWorker`` (the message says which).
    """
    build = WORKERS.get(spec)
    if build is not None:
        return build()
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(
            f"unknown worker {spec!r}: choose one of {', '.join(WORKERS)}, "
            "or give package.module:factory"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} for worker {spec!r}: {exc}") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"{spec!r}: {module_name} has no callable {attribute!r}")
    worker = factory()
    if not isinstance(worker, ModelWorker):
        raise ValueError(
            f"{spec!r} returned {type(worker).__name__}, not a ModelWorker (infer and stream)"
        )
    return worker
