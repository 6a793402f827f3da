"""``Cluster``: one process's part in a pipeline shared over Redis. Private.

It is what the runtime asks of a shared pipeline (``_runtime.Shared``): the Redis client
(one per process, with the distributed mode's timeouts), the request store, and for a
process that runs work, the shared queue and its intake, the tasks that tend them, and how
their work stops (what was taken and not started goes back to the peers at once).
"""

from __future__ import annotations

import functools
import os
import socket
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal, final

import attrs

from orchestrator.distributed._intake import Intake
from orchestrator.distributed._metrics import sample_queue
from orchestrator.distributed._queue import RedisWorkQueue
from orchestrator.distributed._records import RedisRecord
from orchestrator.distributed._store import RedisStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Coroutine, Mapping

    from redis.asyncio import Redis

    from orchestrator._job import Job
    from orchestrator._runtime import Runtime
    from orchestrator.config import PipelineConfig
    from orchestrator.types import PromptRequest

__all__ = ["ROLES", "Cluster", "ClusterConfig", "Role"]

Role = Literal["frontend", "worker", "both"]
ROLES: tuple[Role, ...] = ("frontend", "worker", "both")


def _positive(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attr.name} must be > 0, got {value!r}")


@attrs.frozen(kw_only=True)
class ClusterConfig:
    """How a pipeline shares Redis with its peers.

    Attributes:
        prefix: Prepended to every key and channel (several pipelines may share a Redis).
        capacity: Jobs queued or in a worker's hands, across every process, beyond which
            admission answers ``Overloaded`` (``None``: ``PipelineConfig.inference_capacity``).
        reclaim_after: Seconds an entry may go without its worker renewing its lease
            before a peer takes it over (a dead worker's requests run again elsewhere
            within about twice this).
        max_deliveries: Deliveries after which a job is dead-lettered (its request fails).
        fallback_poll: Seconds between the slow re-reads of a request someone waits on,
            in case a notification was lost.
        block: Seconds one blocking read (of the queue, of a token stream) waits.
        connect_timeout, command_timeout: Seconds to connect, and for one command: a
            Redis that does not answer makes ``submit`` fail within about this.
        max_connections: The process's pool of Redis connections.
        consumer: This process's name in the consumer group (default: host, pid and a
            random suffix).
    """

    prefix: str = "orch:"
    capacity: int | None = None
    reclaim_after: float = attrs.field(default=15.0, validator=_positive)
    max_deliveries: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    fallback_poll: float = attrs.field(default=1.0, validator=_positive)
    block: float = attrs.field(default=0.5, validator=_positive)
    connect_timeout: float = attrs.field(default=1.0, validator=_positive)
    command_timeout: float = attrs.field(default=1.0, validator=_positive)
    max_connections: int = attrs.field(default=256, validator=attrs.validators.ge(4))
    consumer: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ClusterConfig:
        """Defaults, then the environment, then ``overrides``: ``ORCHESTRATOR_REDIS_PREFIX``,
        ``ORCHESTRATOR_SHARED_CAPACITY``, ``ORCHESTRATOR_RECLAIM_AFTER``,
        ``ORCHESTRATOR_MAX_DELIVERIES`` (what processes started by a command line read).

        Raises:
            ValueError: A variable holds something unusable (the message names it).
        """
        env = os.environ if env is None else env
        readers: dict[str, tuple[str, Callable[[str], Any]]] = {
            "ORCHESTRATOR_REDIS_PREFIX": ("prefix", str),
            "ORCHESTRATOR_SHARED_CAPACITY": ("capacity", int),
            "ORCHESTRATOR_RECLAIM_AFTER": ("reclaim_after", float),
            "ORCHESTRATOR_MAX_DELIVERIES": ("max_deliveries", int),
        }
        values: dict[str, Any] = {}
        for variable, (field, parse) in readers.items():
            raw = env.get(variable)
            if raw:
                try:
                    values[field] = parse(raw)
                except ValueError:
                    raise ValueError(f"{variable}={raw!r} is not a valid {field}") from None
        values.update(overrides)
        return cls(**values)


def _consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


def _client(url: str, settings: ClusterConfig) -> Redis:
    try:
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
    except ImportError as exc:
        raise ImportError(
            "the distributed mode needs redis-py: pip install 'prompt-orchestrator[redis]'"
        ) from exc
    from orchestrator._urls import redact_url

    try:
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=settings.max_connections,
            timeout=settings.command_timeout,
            socket_connect_timeout=settings.connect_timeout,
            # A blocking read waits ``block``; the socket must outlast it.
            socket_timeout=settings.command_timeout + settings.block,
            retry=Retry(NoBackoff(), 1),
        )
    except ValueError:
        raise ValueError(f"invalid Redis URL {redact_url(url)!r}") from None
    return Redis.from_pool(pool)


@final
class Cluster:
    """One process of a shared pipeline, in the role ``role``."""

    def __init__(
        self, url: str, role: Role, settings: ClusterConfig, config: PipelineConfig
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        self.role = role
        self.settings = settings
        self.capacity = settings.capacity or config.inference_capacity
        self._config = config
        self._client = _client(url, settings)
        self._store = RedisStore(
            self._client,
            prefix=settings.prefix,
            retention_seconds=config.retention_seconds,
            retention_max=config.retention_max,
            retention_bytes=config.retention_bytes,
            fallback_poll=settings.fallback_poll,
            block=settings.block,
        )
        self.consumer = settings.consumer or _consumer_name()
        self._store.worker_id = self.consumer
        self.queue: RedisWorkQueue | None = None
        self.intake: Intake | None = None

    @property
    def store(self) -> RedisStore:
        return self._store

    @property
    def admits(self) -> bool:
        return self.role != "worker"

    @property
    def runs_work(self) -> bool:
        return self.role != "frontend"

    def attach(self, runtime: Runtime) -> None:
        if not self.runs_work:
            return
        c = self._config
        self.queue = RedisWorkQueue(
            self._client,
            self._store,
            consumer=self.consumer,
            reclaim_after=self.settings.reclaim_after,
            block=self.settings.block,
        )
        self.intake = Intake(
            self.queue,
            self._store,
            rag=runtime.rag,
            deadlines=runtime.deadlines,
            loop=runtime.loop,
            limit=min(c.max_concurrency, c.rag_capacity),
            max_deliveries=self.settings.max_deliveries,
            request_timeout=c.request_timeout,
        )

    def tasks(self) -> list[Callable[[], Coroutine[Any, Any, object]]]:
        tasks: list[Callable[[], Coroutine[Any, Any, object]]] = [
            self._store.listen,
            functools.partial(sample_queue, self._client, self._store.streams, self.queue),
        ]
        if self.intake is not None:
            tasks += [self.intake.run, self.intake.acknowledge, self.intake.renew]
        return tasks

    async def stop(self) -> None:
        if self.intake is not None:
            await self.intake.hand_back()

    async def leftovers(self) -> None:
        if self.intake is not None:
            await self.intake.give_back(self.intake.unfinished())

    def lost(self, request_id: str) -> None:
        if self.intake is not None:
            self.intake.let_go(request_id)

    def new_record(self, request: PromptRequest, *, stream: bool) -> RedisRecord:
        """The record of a request about to be admitted here."""
        return RedisRecord(request, stream=stream, created_at=time.time())

    async def admit(self, job: Job) -> RedisRecord:
        """Record ``job`` and queue it for every worker (see ``RedisStore.admit``)."""
        ttl = job.deadline - time.monotonic() + self._config.retention_seconds
        return await self._store.admit(job, self.capacity, ttl)

    async def completed(self, request: PromptRequest, text: str) -> RedisRecord:
        """Record a request answered at admission (from the cache)."""
        from orchestrator._job import Job
        from orchestrator._priority import Priority

        record = self.new_record(request, stream=False)
        timeout = request.timeout or self._config.request_timeout
        job = Job(record, request, Priority.NORMAL, time.monotonic() + timeout)
        return await self._store.answered(job, text)

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[Cluster]:
        """Hold the client for the pipeline's life; close it after."""
        try:
            yield self
        finally:
            await self._client.aclose()
