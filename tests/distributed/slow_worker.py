"""A worker factory for the process tests: ``--worker tests.distributed.slow_worker:factory``
(an EchoWorker whose delay is ``$SLOW_WORKER_DELAY`` seconds)."""

from __future__ import annotations

import os

from orchestrator import EchoWorker


def factory() -> EchoWorker:
    return EchoWorker(delay=float(os.environ.get("SLOW_WORKER_DELAY", "0.05")))
