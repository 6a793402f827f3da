"""The public API: every ``__all__`` pinned name by name (a change to one is deliberate:
edit the list here in the same commit), the names DESIGN.md fixes import, and the
library never imports a web framework."""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

import orchestrator
import orchestrator.distributed
import orchestrator.enhanced
import orchestrator.workers
import orchestrator_server

if TYPE_CHECKING:
    from types import ModuleType

PINNED: dict[str, list[str]] = {
    "orchestrator": [
        "AssembleOutput",
        "BackendUnavailable",
        "CircuitOpen",
        "EchoWorker",
        "InferenceError",
        "InferenceOutput",
        "InputSender",
        "InvalidRequest",
        "ModelWorker",
        "OrchestratorError",
        "Overloaded",
        "PipelineClosed",
        "PipelineConfig",
        "PipelineHandles",
        "PostOutput",
        "PromptRequest",
        "QueueFull",
        "RagOutput",
        "RateLimited",
        "RequestCancelled",
        "RequestStatus",
        "RequestTimeout",
        "SessionId",
        "StageError",
        "Ticket",
        "__version__",
        "shard_session",
        "spawn_pipeline",
    ],
    "orchestrator.enhanced": [
        "Backoff",
        "CacheLayer",
        "CircuitBreaker",
        "CircuitState",
        "Deduplicator",
        "Priority",
        "PriorityQueue",
        "QueueStats",
        "RateDecision",
        "RateLimiter",
        "RetryPolicy",
        "UsageInfo",
        "cache_key",
        "connect_redis",
    ],
    "orchestrator.workers": [
        "AnthropicWorker",
        "EchoWorker",
        "LlamaCppWorker",
        "ModelWorker",
        "OpenAiWorker",
        "TokenUsage",
        "VllmWorker",
    ],
    "orchestrator.distributed": ["ClusterConfig", "Role"],
    "orchestrator_server": ["ServerConfig", "create_app", "run_server", "start_server"],
}
"""The exact ``__all__`` of each public package."""

MODULES: dict[str, ModuleType] = {
    module.__name__: module
    for module in (
        orchestrator,
        orchestrator.distributed,
        orchestrator.enhanced,
        orchestrator.workers,
        orchestrator_server,
    )
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_all_is_exactly_the_pinned_list(name: str) -> None:
    assert list(MODULES[name].__all__) == PINNED[name]


def test_design_names_import() -> None:
    from orchestrator import (  # noqa: F401
        EchoWorker,
        InferenceError,
        ModelWorker,
        OrchestratorError,
        Overloaded,
        PipelineClosed,
        PipelineConfig,
        PipelineHandles,
        PromptRequest,
        RateLimited,
        RequestStatus,
        SessionId,
        Ticket,
        metrics,
        shard_session,
        spawn_pipeline,
    )
    from orchestrator.enhanced import Priority, PriorityQueue, QueueStats  # noqa: F401

    assert callable(metrics.gather_metrics)
    assert callable(metrics.start_metrics_server)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_all_is_sorted_and_importable(name: str) -> None:
    module = MODULES[name]
    assert list(module.__all__) == sorted(module.__all__)
    for attr in module.__all__:
        assert hasattr(module, attr), f"{name}.{attr}"


def test_error_tree() -> None:  # the whole tree: tests/test_errors.py
    from orchestrator.errors import QueueFull, RequestTimeout

    for name in ("Overloaded", "PipelineClosed", "InferenceError", "RateLimited", "StageError"):
        assert issubclass(getattr(orchestrator, name), orchestrator.OrchestratorError)
    assert issubclass(QueueFull, orchestrator.Overloaded)
    assert issubclass(RequestTimeout, TimeoutError)


def test_library_imports_no_web_framework() -> None:
    code = (
        "import sys, orchestrator, orchestrator.enhanced, orchestrator.workers, "
        "orchestrator.distributed, "
        "orchestrator.metrics\n"
        "bad = [m for m in ('starlette', 'uvicorn', 'fastapi') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
