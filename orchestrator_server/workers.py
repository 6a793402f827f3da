"""Build a worker by name, for the standalone server and its ``--worker`` flag."""

from __future__ import annotations

import importlib

from orchestrator import EchoWorker, ModelWorker

__all__ = ["WORKERS", "make_worker"]

WORKERS: dict[str, str] = {
    "echo": "",
    "openai": "orchestrator.workers.openai:OpenAiWorker",
    "anthropic": "orchestrator.workers.anthropic:AnthropicWorker",
    "llama_cpp": "orchestrator.workers.llamacpp:LlamaCppWorker",
    "vllm": "orchestrator.workers.vllm:VllmWorker",
}
"""Names accepted by ``--worker`` and ``ORCHESTRATOR_WORKER``."""


def make_worker(name: str) -> ModelWorker:
    """A worker configured from the environment (keys, URLs, models).

    Raises:
        ValueError: ``name`` is not one of ``WORKERS``.
    """
    target = WORKERS.get(name)
    if target is None:
        raise ValueError(f"unknown worker {name!r}: choose one of {', '.join(WORKERS)}")
    if not target:
        return EchoWorker()
    module_name, _, class_name = target.partition(":")
    worker: ModelWorker = getattr(importlib.import_module(module_name), class_name)()
    return worker
