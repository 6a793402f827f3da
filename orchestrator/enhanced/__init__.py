"""Policies around the pipeline: cache, rate limits, priority queue, dedup, breaker, retry.

Each works alone and plugs into ``PipelineConfig`` (``cache=``, ``rate_limiter=``,
``dedup=``, ``retry=``, ``circuit_breaker=``). The priority queue is the pipeline's
inference channel and lives in the core; it is exported here. ``connect_redis`` makes one
Redis client for a cache and a limiter to share.
"""

from __future__ import annotations

from orchestrator._priority import Priority, PriorityQueue, QueueStats
from orchestrator.enhanced._redis import connect_redis
from orchestrator.enhanced.cache import CacheLayer, cache_key
from orchestrator.enhanced.circuit_breaker import CircuitBreaker, CircuitState
from orchestrator.enhanced.dedup import Deduplicator
from orchestrator.enhanced.rate_limit import RateDecision, RateLimiter, UsageInfo
from orchestrator.enhanced.retry import Backoff, RetryPolicy

__all__ = [
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
]
