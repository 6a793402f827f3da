"""Per-session rate limits: a token bucket per session, in process or shared through Redis.

A session's bucket holds ``max_requests`` tokens and refills at ``max_requests /
window_secs`` per second; a request takes a token or is refused. ``RateLimiter(...)`` keeps
one float per session (GCRA's "theoretical arrival time", an exact token-bucket
equivalent); ``new_governor`` one ``aiolimiter.AsyncLimiter`` per session; ``new_redis`` one
Redis hash per session, changed by one atomic Lua script per check on the server's clock.
A bucket that has refilled completely is the same as a new one, so the in-process backends
drop it (a few per check, oldest first) and Redis expires it: memory follows the sessions
active within one window, not every session ever seen. docs/rate-limiting.md has more.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Protocol, final

from orchestrator import metrics
from orchestrator.enhanced._rate_limit_local import GovernorBuckets, TokenBuckets
from orchestrator.enhanced._rate_limit_redis import RedisBuckets
from orchestrator.enhanced._rate_types import RateDecision, UsageInfo
from orchestrator.enhanced._redis import SUSPECT_FRACTION, Outage, client_for

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType
    from typing import Self

    from redis.asyncio import Redis

    from orchestrator.types import SessionId

__all__ = ["RateDecision", "RateLimiter", "UsageInfo"]

logger = logging.getLogger(__name__)


class _Buckets(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def limit(self) -> int: ...

    @property
    def window(self) -> float: ...

    async def take(self, session: str) -> bool: ...

    async def decide(self, session: str) -> RateDecision: ...

    async def usage(self, session: str) -> UsageInfo | None: ...

    def tracked(self) -> int | None: ...

    async def aclose(self) -> None: ...


def _validate(max_requests: int, window_secs: float, max_sessions: int | None = None) -> None:
    if isinstance(max_requests, bool) or not isinstance(max_requests, int) or max_requests < 1:
        raise ValueError(f"max_requests must be an int >= 1, got {max_requests!r}")
    if not (0 < window_secs < math.inf):
        raise ValueError(f"window_secs must be > 0 and finite, got {window_secs!r}")
    if max_sessions is not None and max_sessions < 1:
        raise ValueError(f"max_sessions must be >= 1 or None, got {max_sessions!r}")


@final
class RateLimiter:
    """Per-session token buckets: ``max_requests`` per ``window_secs``, bursts allowed.

    ``RateLimiter(...)`` keeps buckets in this process; see ``new_governor`` and
    ``new_redis`` for the other backends. They share this API and its contract.

    Args:
        max_requests: Bucket capacity: requests a fresh session may make at once.
        window_secs: Seconds for an empty bucket to refill completely.
        clock: Monotonic seconds; tests pass a fake one.
        max_sessions: A hard cap on buckets held; at the cap the least recently allowed
            session's bucket is dropped (resetting its budget). ``None`` (the default)
            bounds memory by the sessions active within one window.

    Raises:
        ValueError: ``max_requests`` < 1, ``window_secs`` not > 0, or ``max_sessions`` < 1.

    Example:
        >>> async def handle(limiter: RateLimiter, session: str) -> str:
        ...     decision = await limiter.decide(session)
        ...     if not decision.allowed:
        ...         return f"429, retry in {decision.retry_after:.1f}s"
        ...     return "200"
        >>> limiter = RateLimiter(100, 60)  # 100 requests a minute per session
    """

    __slots__ = ("_allowed", "_buckets", "_limited")

    def __init__(
        self,
        max_requests: int,
        window_secs: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_sessions: int | None = None,
    ) -> None:
        _validate(max_requests, window_secs, max_sessions)
        self._setup(TokenBuckets(max_requests, window_secs, clock, max_sessions))

    def _setup(self, buckets: _Buckets) -> None:
        self._buckets = buckets
        self._allowed = metrics.RATE_LIMIT_DECISIONS.labels("allowed")
        self._limited = metrics.RATE_LIMIT_DECISIONS.labels("limited")

    @classmethod
    def _of(cls, buckets: _Buckets) -> RateLimiter:
        self = cls.__new__(cls)
        self._setup(buckets)
        return self

    @classmethod
    def new_governor(
        cls, max_requests: int, window_secs: float, *, max_sessions: int | None = None
    ) -> RateLimiter:
        """Buckets in this process, one ``aiolimiter.AsyncLimiter`` per session.

        The check never waits: it asks ``has_capacity()`` and only then ``acquire()``s.
        Time comes from the running event loop's clock (``loop.time()``), as in aiolimiter.

        Args:
            max_requests: Bucket capacity.
            window_secs: Seconds for an empty bucket to refill completely.
            max_sessions: A hard cap on sessions held, as for ``RateLimiter``.

        Raises:
            ValueError: Invalid arguments, as for ``RateLimiter``.
        """
        _validate(max_requests, window_secs, max_sessions)
        return cls._of(GovernorBuckets(max_requests, window_secs, max_sessions))

    @classmethod
    async def new_redis(
        cls,
        url: str | None,
        max_requests: int,
        window_secs: float,
        *,
        prefix: str = "orchestrator:ratelimit:",
        client: Redis | None = None,
        fail_open: bool = True,
        connect_timeout: float = 1.0,
        command_timeout: float = 1.0,
        max_connections: int = 64,
        probe_interval: float = 1.0,
        ping: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> RateLimiter:
        """Buckets in Redis, exact across every replica that uses the same server and prefix.

        Each check runs one Lua script, atomically: refill the session's bucket by the time
        elapsed on the Redis server's clock (``TIME``, so replicas' clocks do not matter),
        take a token if there is one, and ``PEXPIRE`` the key at the moment the bucket
        would be full, so idle sessions vanish. Limiters with the same prefix share
        budgets, so give them the same limits.

        Args:
            url: ``redis://[user:password@]host:port/db``, or ``None`` with ``client``.
            max_requests: Bucket capacity.
            window_secs: Seconds for an empty bucket to refill completely.
            prefix: Prepended to the session to make its key.
            client: A ``redis.asyncio.Redis`` to borrow instead of ``url`` (never closed),
                such as one from ``connect_redis`` shared with a cache.
            fail_open: When Redis cannot be reached: allow the request (``True``) or
                refuse it with ``retry_after=probe_interval`` (``False``).
            connect_timeout: Seconds to open a connection.
            command_timeout: Seconds for one check, and to wait for a pooled connection.
                A check unanswered for a quarter of it starts an outage (with a borrowed
                client too).
            max_connections: Size of the connection pool the limiter creates.
            probe_interval: While Redis is failing, seconds between checks that try it,
                one at a time (the others take the ``fail_open`` answer at once, the
                checks already waiting included).
            ping: Check that the server answers before returning.
            clock: Monotonic seconds, for ``probe_interval`` only (the quarter of
                ``command_timeout`` is timed on the event loop's clock, like the timeout).

        Raises:
            ValueError: Invalid arguments, or neither or both of ``url`` and ``client``.
            BackendUnavailable: ``ping`` is true and the server did not answer.
        """
        _validate(max_requests, window_secs)
        if not probe_interval >= 0:
            raise ValueError(f"probe_interval must be >= 0, got {probe_interval!r}")
        redis_client, owned = await client_for(
            url,
            client,
            connect_timeout=connect_timeout,
            command_timeout=command_timeout,
            max_connections=max_connections,
            ping=ping,
        )
        from redis.exceptions import RedisError  # installed: client_for checked

        outage = Outage(
            "rate limiter's Redis",
            f"{'allowing' if fail_open else 'refusing'} every request",
            probe_interval,
            clock,
            logger,
            suspect_after=command_timeout * SUSPECT_FRACTION,
            errors=(RedisError, OSError),
        )
        buckets = RedisBuckets(
            redis_client,
            prefix,
            max_requests,
            window_secs,
            owned=owned,
            fail_open=fail_open,
            outage=outage,
        )
        return cls._of(buckets)

    # -- the API ---------------------------------------------------------------------------

    @property
    def limit(self) -> int:
        """Requests per window: the bucket capacity."""
        return self._buckets.limit

    @property
    def window_secs(self) -> float:
        """Seconds for an empty bucket to refill completely."""
        return self._buckets.window

    @property
    def backend(self) -> str:
        """``"simple"``, ``"governor"`` or ``"redis"``."""
        return self._buckets.name

    @property
    def tracked_sessions(self) -> int | None:
        """Buckets held in this process (``None`` for Redis, where keys expire)."""
        return self._buckets.tracked()

    async def check(self, session: SessionId | str) -> bool:
        """Take a token from the session's bucket if it has one.

        Returns:
            Whether the request is allowed; the same as ``(await decide(session)).allowed``.
        """
        allowed = await self._buckets.take(str(session))
        (self._allowed if allowed else self._limited).inc()
        return allowed

    async def decide(self, session: SessionId | str) -> RateDecision:
        """Like ``check``, with the numbers a 429 response needs."""
        decision = await self._buckets.decide(str(session))
        (self._allowed if decision.allowed else self._limited).inc()
        return decision

    async def get_usage(self, session: SessionId | str) -> UsageInfo | None:
        """The session's usage, without taking a token.

        Returns:
            ``None`` for a session never seen or whose bucket is full again.
        """
        return await self._buckets.usage(str(session))

    async def aclose(self) -> None:
        """Close what the limiter owns (a Redis client it created); idempotent."""
        await self._buckets.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"RateLimiter({self.backend}, {self.limit} per {self.window_secs:g}s)"
