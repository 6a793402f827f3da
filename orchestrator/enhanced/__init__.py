"""Policies around the pipeline: priority queue (and, as they land, cache, limits, dedup...)."""

from __future__ import annotations

from orchestrator.enhanced.priority import Priority, PriorityQueue, QueueStats

__all__ = ["Priority", "PriorityQueue", "QueueStats"]
