"""Build a worker by name, for the standalone server and its ``--worker`` flag.

Each reads its settings from the environment, like the official SDKs: keys and URLs as the
worker classes document, plus the model: ``OPENAI_MODEL`` (default ``gpt-4o-mini``),
``ANTHROPIC_MODEL`` (default ``claude-3-5-haiku-latest``), ``VLLM_MODEL`` (required: the
model your vLLM server serves).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from orchestrator import EchoWorker, ModelWorker

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

    return LlamaCppWorker()


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


def make_worker(name: str) -> ModelWorker:
    """A worker configured from the environment (keys, URLs, models).

    Raises:
        ValueError: ``name`` is not one of ``WORKERS``, or a setting it needs is missing
            (the message says which).
    """
    build = WORKERS.get(name)
    if build is None:
        raise ValueError(f"unknown worker {name!r}: choose one of {', '.join(WORKERS)}")
    return build()
