"""The priority queue: ``Priority``, ``PriorityQueue`` and ``QueueStats``.

They live in the core (``orchestrator._priority``), since the queue is the pipeline's
inference channel; this module keeps ``orchestrator.enhanced.priority`` importable.
"""

from __future__ import annotations

from orchestrator._priority import Priority, PriorityQueue, QueueStats

__all__ = ["Priority", "PriorityQueue", "QueueStats"]
