"""Model workers: the ``ModelWorker`` protocol, ``EchoWorker``, and HTTP workers."""

from __future__ import annotations

from orchestrator.workers.base import EchoWorker, ModelWorker

__all__ = ["EchoWorker", "ModelWorker"]
