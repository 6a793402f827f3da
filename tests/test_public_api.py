"""The names DESIGN.md fixes import, and the library never imports a web framework."""

from __future__ import annotations

import subprocess
import sys

import orchestrator
import orchestrator.enhanced
import orchestrator.workers


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


def test_all_is_sorted_and_complete() -> None:
    for module in (orchestrator, orchestrator.enhanced, orchestrator.workers):
        assert list(module.__all__) == sorted(module.__all__), module.__name__
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"


def test_error_tree() -> None:
    from orchestrator.errors import QueueFull, RequestTimeout

    for name in ("Overloaded", "PipelineClosed", "InferenceError", "RateLimited", "StageError"):
        assert issubclass(getattr(orchestrator, name), orchestrator.OrchestratorError)
    assert issubclass(QueueFull, orchestrator.Overloaded)
    assert issubclass(RequestTimeout, TimeoutError)


def test_library_imports_no_web_framework() -> None:
    code = (
        "import sys, orchestrator, orchestrator.enhanced, orchestrator.workers, "
        "orchestrator.metrics\n"
        "bad = [m for m in ('starlette', 'uvicorn', 'fastapi') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
