"""Redis plumbing shared by ``cache`` and ``rate_limit``.

``connect_redis`` (public, as ``orchestrator.enhanced.connect_redis``) makes a client
that several backends can share; ``client_for`` makes (or borrows) a backend's client,
``Outage`` lets calls through to the server and answers ``DOWN`` for it while it is
failing, and ``RedisClientOwner`` closes a client the object created. redis-py is
imported on use: it is the optional ``redis`` extra.
"""

from __future__ import annotations

import asyncio
import enum
import time
import warnings
from typing import TYPE_CHECKING, ClassVar, Final, ParamSpec, TypeVar, cast, final

from orchestrator._urls import redact_url
from orchestrator.errors import BackendUnavailable

if TYPE_CHECKING:
    import logging
    from collections.abc import Awaitable, Callable

    from redis.asyncio import Redis

P = ParamSpec("P")
T = TypeVar("T")


SUSPECT_FRACTION: Final = 0.25
"""A call unanswered for this part of the command timeout starts an outage.

A healthy Redis answers in well under a millisecond; one that has not answered after a
quarter of the timeout is failing or frozen, and waiting out the rest would only make
every other caller wait with it."""

# asyncio runs a timer up to one clock tick early; a moment that close has passed.
_RESOLUTION: Final = time.get_clock_info("monotonic").resolution


class Down(enum.Enum):
    """What ``Outage.call`` answers instead of the call's result: take the degraded answer."""

    DOWN = enum.auto()


DOWN: Final = Down.DOWN


@final
class Outage:
    """Admission and outage bookkeeping of one Redis-backed object (a cache's or a limiter's).

    Every call goes through ``call``, which answers ``DOWN`` instead of raising one of
    ``errors``. While the server is healthy every call goes through, and the calls in
    flight are watched: an outage starts when one fails, or when the oldest has waited
    ``suspect_after`` seconds (on the event loop's clock) without an answer. Then the
    calls in flight are released (each task is cancelled and the cancellation taken back,
    so the call answers ``DOWN``), except an overdue one, which goes on as the probe.
    While down, one call at a time is the probe, at most one per ``probe_interval``, and
    every other call answers ``DOWN`` at once. The first call that succeeds ends it.

    Logs one warning when the outage starts and one info line when a call succeeds again.
    ``log`` is the owner's module logger, so the lines carry the name of the module a user
    configures.
    """

    __slots__ = (
        "_clock",
        "_consequence",
        "_degraded",
        "_errors",
        "_inflight",
        "_log",
        "_loop",
        "_next_probe",
        "_probe",
        "_released",
        "_suspect_after",
        "_timer",
        "_what",
        "down_since",
        "probe_interval",
    )

    def __init__(
        self,
        what: str,
        consequence: str,
        probe_interval: float,
        clock: Callable[[], float],
        log: logging.Logger,
        *,
        suspect_after: float | None = None,
        errors: tuple[type[Exception], ...] = (Exception,),
    ) -> None:
        self._what = what
        self._consequence = consequence
        self._log = log
        self.probe_interval = probe_interval
        self._clock = clock
        self._suspect_after = suspect_after
        self._errors = errors
        self.down_since: float | None = None
        self._next_probe = 0.0
        self._degraded = 0
        # Healthy calls in flight and the loop time each started, oldest first (a dict
        # keeps insertion order, so the oldest is the first key).
        self._inflight: dict[asyncio.Task[object], float] = {}
        self._released: set[asyncio.Task[object]] = set()  # cancelled by us, not taken back
        self._probe: asyncio.Task[object] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def down(self) -> bool:
        return self.down_since is not None

    async def call(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T | Down:
        """``await fn(*args, **kwargs)``, or ``DOWN`` (counted) when the server is failing.

        Raises:
            BaseException: What ``fn`` raised outside ``errors``, and a cancellation from
                anyone but this object.
        """
        task = cast("asyncio.Task[object]", asyncio.current_task())  # awaited, so in a task
        if self.down_since is not None:
            if self._probe is not None or self._clock() < self._next_probe:
                return self._degrade()
            self._probe = task
            try:
                result = await fn(*args, **kwargs)
            except self._errors as exc:
                self.failed(exc)
                return DOWN
            finally:
                self._probe = None
            self.succeeded()
            return result
        inflight = self._inflight
        cancelling = task.cancelling()
        if self._suspect_after is None:
            inflight[task] = 0.0
        else:
            loop = asyncio.get_running_loop()
            inflight[task] = now = loop.time()
            if self._timer is None or self._loop is not loop:
                self._loop = loop
                self._timer = loop.call_at(now + self._suspect_after, self._check)
        try:
            result = await fn(*args, **kwargs)
        except asyncio.CancelledError:
            if self._take_back(task, cancelling):
                return self._degrade()
            raise
        except self._errors as exc:
            inflight.pop(task, None)  # failed() releases the calls in flight: not this one
            self.failed(exc)
            return DOWN
        finally:
            inflight.pop(task, None)
            if self._probe is task:  # the overdue call that became the probe
                self._probe = None
            if self._released:
                self._take_back(task, cancelling)
        if self.down_since is not None:
            self.succeeded()
        return result

    def failed(self, exc: Exception) -> None:
        """Count a call that failed with ``exc``: the outage starts, or goes on."""
        now = self._clock()
        self._next_probe = now + self.probe_interval
        self._degraded += 1
        if self.down_since is None:
            self._begin(now, f"{type(exc).__name__}: {exc}")

    def succeeded(self) -> None:
        """A call was answered: the outage, if any, is over."""
        if self.down_since is not None:
            self._log.info(
                "%s answers again after %.1fs (%d calls degraded)",
                self._what,
                self._clock() - self.down_since,
                self._degraded,
            )
            self.down_since = None
            self._degraded = 0

    def _degrade(self) -> Down:
        self._degraded += 1
        return DOWN

    def _begin(self, now: float, why: str) -> None:
        self.down_since = now
        self._next_probe = now + self.probe_interval
        self._log.warning(
            "%s is unavailable, %s until it answers: %s", self._what, self._consequence, why
        )
        inflight = self._inflight
        for task in inflight:
            task.cancel()
        self._released.update(inflight)
        inflight.clear()

    def _take_back(self, task: asyncio.Task[object], cancelling: int) -> bool:
        """Whether ``task`` was released; if so, withdraw its cancellation request.

        ``False`` also when someone else cancelled the task meanwhile: that cancellation
        stands (``Task.uncancel`` counts requests, as ``asyncio.timeout`` does).
        """
        released = self._released
        if task not in released:
            return False
        released.discard(task)
        return task.uncancel() <= cancelling

    def _check(self) -> None:
        # One timer for the oldest call in flight, armed by a call when none is and re-armed
        # here for the next oldest: a timer handle per call would cost more than the rest.
        self._timer = None
        inflight, loop, after = self._inflight, self._loop, self._suspect_after
        if not inflight or loop is None or after is None:
            return
        oldest, since = next(iter(inflight.items()))
        if loop.time() + _RESOLUTION < since + after:
            self._timer = loop.call_at(since + after, self._check)
            return
        del inflight[oldest]  # it goes on waiting, as the probe
        self._probe = oldest
        self._begin(self._clock(), f"no answer within {after:g}s")


async def connect_redis(
    url: str,
    *,
    connect_timeout: float = 1.0,
    command_timeout: float = 1.0,
    max_connections: int = 64,
    ping: bool = True,
) -> Redis:
    """A Redis client with the settings the backends want, for several of them to share.

    ``CacheLayer.new_redis(url)`` and ``RateLimiter.new_redis(url, ...)`` each open a pool
    of their own; a process that has both can open one and lend it to each with
    ``client=``. The backends never close a borrowed client: the caller does, after them.

    Args:
        url: ``redis://[user:password@]host[:port][/db]`` (or ``rediss://``, ``unix://``).
        connect_timeout: Seconds to open a connection.
        command_timeout: Seconds for one command, and to wait for a free pooled connection.
        max_connections: Size of the connection pool (shared by every borrower).
        ping: Check that the server answers before returning.

    Returns:
        A ``redis.asyncio.Redis`` over a blocking pool, one immediate retry per command
        (after a server restart the first command meets a dead socket and reconnects).
        Close it with ``await client.aclose()``.

    Raises:
        ValueError: A bad URL (the message shows it with its password redacted).
        BackendUnavailable: ``ping`` is true and the server did not answer.
        ImportError: redis-py is not installed (the ``redis`` extra).

    Example:
        >>> async def main() -> None:  # doctest: +SKIP
        ...     client = await connect_redis("redis://localhost:6379/0")
        ...     try:
        ...         cache = await CacheLayer.new_redis(client=client)
        ...         limiter = await RateLimiter.new_redis(None, 100, 60, client=client)
        ...         ...  # PipelineConfig(cache=cache, rate_limiter=limiter)
        ...     finally:
        ...         await client.aclose()
    """
    client, _ = await client_for(
        url,
        None,
        connect_timeout=connect_timeout,
        command_timeout=command_timeout,
        max_connections=max_connections,
        ping=ping,
    )
    return client


async def client_for(
    url: str | None,
    client: Redis | None,
    *,
    connect_timeout: float,
    command_timeout: float,
    max_connections: int,
    ping: bool,
) -> tuple[Redis, bool]:
    """A backend's client (a new one for ``url``, or ``client`` borrowed) and whether it
    owns it.

    Raises:
        ValueError: Neither or both of ``url`` and ``client``, or a bad URL.
        BackendUnavailable: ``ping`` is true and the server did not answer.
        ImportError: redis-py is not installed (the ``redis`` extra).
    """
    try:
        import redis  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "the Redis backends need redis-py: pip install 'prompt-orchestrator[redis]'"
        ) from exc
    from redis.asyncio import BlockingConnectionPool
    from redis.asyncio import Redis as _Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisError

    if (url is None) == (client is None):
        raise ValueError("pass exactly one of url or client")
    owned = client is None
    if client is None:
        assert url is not None
        # One immediate retry: after a server restart the first command on a pooled
        # connection meets the dead socket, and the retry reconnects. More retries (or
        # redis-py's default backoff) would only stretch an outage into every call.
        try:
            pool = BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=command_timeout,
                socket_connect_timeout=connect_timeout,
                socket_timeout=command_timeout,
                retry=Retry(NoBackoff(), 1),
            )
        except ValueError:  # redis-py's message may quote a piece of the password
            raise ValueError(
                f"invalid Redis URL {redact_url(url)!r}: expected redis://[user:password@]"
                "host[:port][/db] (or rediss://, unix://), with a password percent-encoded"
            ) from None
        client = _Redis.from_pool(pool)
    if ping:
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            if owned:
                await client.aclose()
            where = redact_url(url) if url is not None else "the given client"
            raise BackendUnavailable(
                f"Redis at {where} did not answer PING: {exc}", backend="redis"
            ) from exc
    return client, owned


class RedisClientOwner:
    """Base of a backend holding a client from ``client_for``: closes it if owned.

    A subclass sets ``_client``, ``_owned`` and ``_closed = False`` in ``__init__`` and
    says in ``_unclosed_warning`` how to close it; an owned client never closed warns
    ``ResourceWarning`` when the backend is collected.
    """

    __slots__ = ()

    _client: Redis
    _owned: bool
    _closed: bool
    _unclosed_warning: ClassVar[str]

    async def aclose(self) -> None:
        if not self._closed:
            # mypy checks against this class's empty __slots__; each subclass holds _closed.
            self._closed = True  # type: ignore[misc]
            if self._owned:
                await self._client.aclose()

    def __del__(self) -> None:
        if self._owned and not getattr(self, "_closed", True):
            warnings.warn(
                self._unclosed_warning,
                ResourceWarning,
                source=self,
                stacklevel=1,
            )
