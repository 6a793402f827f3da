"""The shared queue's gauges, sampled from Redis. Private.

``orchestrator_shared_queue_depth{priority}`` (jobs no worker has taken yet: the consumer
group's ``lag``) and ``orchestrator_shared_queue_pending{priority}`` (jobs in a worker's
hands) are the same in every process, read with ``XINFO GROUPS`` every ``every`` seconds;
``orchestrator_shared_leases`` is this process's own share.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio

from orchestrator import metrics
from orchestrator.distributed._queue import GROUP
from orchestrator.distributed._redis import command
from orchestrator.distributed._store import LEVELS
from orchestrator.errors import BackendUnavailable

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from orchestrator.distributed._queue import RedisWorkQueue

__all__ = ["sample_queue"]

logger = logging.getLogger("orchestrator.distributed")


def _field(info: dict[Any, Any], name: str) -> Any:
    return info.get(name, info.get(name.encode()))


async def sample_queue(
    client: Redis, streams: list[str], queue: RedisWorkQueue | None, every: float = 2.0
) -> None:
    """Update the shared queue's gauges until cancelled (a task the runtime owns)."""
    while True:
        try:
            for level, stream in zip(LEVELS, streams, strict=True):
                groups = await command(client.xinfo_groups(stream))
                ours = next((g for g in groups if _text(_field(g, "name")) == GROUP), None)
                lag = _field(ours, "lag") if ours is not None else 0
                pending = _field(ours, "pending") if ours is not None else 0
                metrics.SHARED_QUEUE_DEPTH.set((level,), float(lag or 0))
                metrics.SHARED_QUEUE_PENDING.set((level,), float(pending or 0))
        except BackendUnavailable:
            pass  # the stream (or Redis) is not there yet: the next sample will tell
        except Exception as exc:  # a stream that does not exist yet answers an error
            logger.debug("shared queue sample failed: %r", exc)
        if queue is not None:
            metrics.LEASES.set((), float(queue.leases))
        await anyio.sleep(every)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
