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

import collections
import logging
import math
import time
import warnings
from typing import TYPE_CHECKING, Final, Protocol, cast, final

import attrs
from aiolimiter import AsyncLimiter

from orchestrator import metrics
from orchestrator.enhanced.cache import _connect_redis, _Outage

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType
    from typing import Self

    from redis.asyncio import Redis

    from orchestrator.types import SessionId

__all__ = ["RateDecision", "RateLimiter", "UsageInfo"]

logger = logging.getLogger(__name__)

_SWEEP: Final = 8
"""Idle buckets dropped at most per check: bounded work, and more than one check adds."""

_EPS: Final = 1e-9
"""Relative slack for float comparisons (``3 * (1/3)`` is not always ``1.0``)."""


@attrs.frozen(kw_only=True)
class RateDecision:
    """The answer to one request: allowed or not, and the numbers for the 429 headers.

    Attributes:
        allowed: Whether the request may proceed (it took a token).
        limit: Requests per window (the bucket's capacity).
        remaining: Whole tokens left after this request.
        retry_after: Seconds until a request would be allowed (0.0 when allowed).
        reset_in: Seconds until the bucket is full again.

    Example:
        >>> RateDecision(allowed=False, limit=10, remaining=0, retry_after=6.0, reset_in=60.0)
        RateDecision(allowed=False, limit=10, remaining=0, retry_after=6.0, reset_in=60.0)
    """

    allowed: bool
    limit: int
    remaining: int
    retry_after: float
    reset_in: float


@attrs.frozen
class UsageInfo:
    """How much of its budget a session has used, from ``RateLimiter.get_usage``.

    Attributes:
        used: Tokens taken and not yet refilled (a partly refilled token counts as used).
        remaining: Whole tokens available now; ``used + remaining`` is the limit.
        reset_in_secs: Seconds until the bucket is full again.

    Example:
        >>> UsageInfo(used=3, remaining=97, reset_in_secs=1.8)
        UsageInfo(used=3, remaining=97, reset_in_secs=1.8)
    """

    used: int
    remaining: int
    reset_in_secs: float


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
        self._setup(_TokenBuckets(max_requests, window_secs, clock, max_sessions))

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
        return cls._of(_GovernorBuckets(max_requests, window_secs, max_sessions))

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
            client: A ``redis.asyncio.Redis`` to borrow instead of ``url`` (never closed).
            fail_open: When Redis cannot be reached: allow the request (``True``) or
                refuse it with ``retry_after=probe_interval`` (``False``).
            connect_timeout: Seconds to open a connection.
            command_timeout: Seconds for one check, and to wait for a pooled connection.
            max_connections: Size of the connection pool the limiter creates.
            probe_interval: While Redis is failing, seconds between checks that try it
                (the others take the ``fail_open`` answer at once).
            ping: Check that the server answers before returning.
            clock: Monotonic seconds, for ``probe_interval`` only.

        Raises:
            ValueError: Invalid arguments, or neither or both of ``url`` and ``client``.
            ConnectionError: ``ping`` is true and the server did not answer.
        """
        _validate(max_requests, window_secs)
        if not probe_interval >= 0:
            raise ValueError(f"probe_interval must be >= 0, got {probe_interval!r}")
        redis_client, owned = await _connect_redis(
            url,
            client,
            connect_timeout=connect_timeout,
            command_timeout=command_timeout,
            max_connections=max_connections,
            ping=ping,
        )
        buckets = _RedisBuckets(
            redis_client,
            prefix,
            max_requests,
            window_secs,
            owned=owned,
            fail_open=fail_open,
            outage=_Outage("rate limiter's Redis", probe_interval, clock, logger),
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


class _BucketMath:
    """The numbers of a bucket from its ``level``: tokens taken and not yet refilled."""

    __slots__ = ("_rate", "limit", "window")

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._rate = limit / window  # tokens per second

    def _remaining(self, level: float) -> int:
        return max(0, math.floor(self.limit - level + _EPS))

    def _decision(self, allowed: bool, level: float) -> RateDecision:
        return RateDecision(
            allowed=allowed,
            limit=self.limit,
            remaining=self._remaining(level),
            retry_after=0.0 if allowed else max(level + 1 - self.limit, 0.0) / self._rate,
            reset_in=level / self._rate,
        )

    def _usage(self, level: float) -> UsageInfo:
        remaining = self._remaining(level)
        return UsageInfo(self.limit - remaining, remaining, level / self._rate)


@final
class _TokenBuckets(_BucketMath):
    """Token buckets as GCRA: per session, only the time ``tat`` at which it is full.

    With ``T = window / limit`` seconds per token, the level at ``now`` is
    ``(tat - now) / T``. A request is allowed while ``tat - now <= window - T`` (a token is
    left to take) and moves ``tat`` on by ``T``. Sessions are kept in order of their last
    allowed request; one allowed at ``t`` is full by ``t + window``, so the oldest are
    dropped first, as soon as they are full.
    """

    __slots__ = ("_clock", "_dropped", "_interval", "_max_sessions", "_tats", "_tolerance")

    name: Final = "simple"

    def __init__(
        self, limit: int, window: float, clock: Callable[[], float], max_sessions: int | None
    ) -> None:
        super().__init__(limit, window)
        self._clock = clock
        self._interval = window / limit
        self._tolerance = window - self._interval + self._interval * _EPS
        self._max_sessions = max_sessions
        self._tats: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._dropped = 0

    def tracked(self) -> int:
        return len(self._tats)

    def _admit(self, session: str) -> tuple[float, float | None]:
        """Sweep, then take a token: ``(now, new tat)``, or ``(now, None)`` when refused."""
        now = self._clock()
        tats = self._tats
        dropped = 0  # the oldest buckets, if full again
        while dropped < _SWEEP and tats and tats[oldest := next(iter(tats))] <= now:
            del tats[oldest]
            dropped += 1
        if dropped and _shrink(self, dropped, len(tats)):
            tats = self._tats = collections.OrderedDict(tats)
        tat = tats.get(session)
        if tat is None:
            if self._max_sessions is not None and len(tats) >= self._max_sessions:
                tats.popitem(last=False)
            tats[session] = new = now + self._interval
            return now, new
        if tat < now:
            tat = now
        if tat - now > self._tolerance:
            return now, None
        tats[session] = new = tat + self._interval
        tats.move_to_end(session)
        return now, new

    async def take(self, session: str) -> bool:
        return self._admit(session)[1] is not None

    async def decide(self, session: str) -> RateDecision:
        now, new = self._admit(session)
        if new is None:
            return self._decision(False, (self._tats[session] - now) / self._interval)
        return self._decision(True, (new - now) / self._interval)

    async def usage(self, session: str) -> UsageInfo | None:
        tat = self._tats.get(session)
        now = self._clock()
        if tat is None:
            return None
        if tat <= now:
            del self._tats[session]
            return None
        return self._usage((tat - now) / self._interval)

    async def aclose(self) -> None:
        self._tats.clear()


@final
class _GovernorBuckets(_BucketMath):
    """One ``aiolimiter.AsyncLimiter`` per session, in order of the last allowed request.

    aiolimiter is a leaky bucket: its level rises by one per acquisition and drains at
    ``limit / window`` per second, and a request fits while ``level + 1 <= limit``: the
    same arithmetic as the token bucket. A limiter drained to 0 is a fresh one, dropped.
    """

    __slots__ = ("_dropped", "_limiters", "_max_sessions")

    name: Final = "governor"

    def __init__(self, limit: int, window: float, max_sessions: int | None) -> None:
        super().__init__(limit, window)
        self._max_sessions = max_sessions
        self._limiters: collections.OrderedDict[str, AsyncLimiter] = collections.OrderedDict()
        self._dropped = 0

    def tracked(self) -> int:
        return len(self._limiters)

    async def _admit(self, session: str) -> tuple[AsyncLimiter, bool]:
        limiters = self._limiters
        dropped = 0  # the oldest limiters, if drained
        while (
            dropped < _SWEEP
            and limiters
            and limiters[oldest := next(iter(limiters))].has_capacity(self.limit)
        ):
            del limiters[oldest]
            dropped += 1
        if dropped and _shrink(self, dropped, len(limiters)):
            limiters = self._limiters = collections.OrderedDict(limiters)
        limiter = limiters.get(session)
        if limiter is None:
            if self._max_sessions is not None and len(limiters) >= self._max_sessions:
                limiters.popitem(last=False)
            limiter = limiters[session] = AsyncLimiter(self.limit, self.window)
        elif not limiter.has_capacity():
            return limiter, False
        else:
            limiters.move_to_end(session)
        await limiter.acquire()  # it has capacity: this returns without waiting
        return limiter, True

    async def take(self, session: str) -> bool:
        return (await self._admit(session))[1]

    async def decide(self, session: str) -> RateDecision:
        limiter, allowed = await self._admit(session)
        return self._decision(allowed, _level(limiter))

    async def usage(self, session: str) -> UsageInfo | None:
        limiter = self._limiters.get(session)
        if limiter is None:
            return None
        if limiter.has_capacity(self.limit):
            del self._limiters[session]
            return None
        return self._usage(_level(limiter))

    async def aclose(self) -> None:
        self._limiters.clear()


def _shrink(buckets: _TokenBuckets | _GovernorBuckets, dropped: int, size: int) -> bool:
    """Count ``dropped`` buckets; true when the table should be copied to a smaller one.

    A dict never shrinks as keys leave, so after a flood of sessions its table would stay
    at the peak size. Copying once drops outnumber the live buckets 4 to 1 costs O(live),
    paid for by those drops: amortised O(1) per bucket.
    """
    buckets._dropped += dropped
    if buckets._dropped <= 4 * size + 1024:
        return False
    buckets._dropped = 0
    return True


def _level(limiter: AsyncLimiter) -> float:
    # aiolimiter has no public accessor for its level; 1.0 to 1.3 keep it in ``_level``,
    # drained to now by the has_capacity()/acquire() just before. A test pins this.
    level: float = limiter._level
    return level


_LUA: Final = """
-- One session's token bucket, refilled by the time elapsed on this server's clock.
-- KEYS[1]: a hash {tokens, ts (ms)}. ARGV: capacity, window (ms), 1 to take a token or
-- 0 to peek. Take returns {allowed, tokens}; peek returns tokens, or nil when full.
-- Tokens go back as strings: a Lua number in a reply is truncated to an integer.
local capacity = tonumber(ARGV[1])
local rate = capacity / tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = capacity
  ts = now
elseif now > ts then
  tokens = math.min(capacity, tokens + (now - ts) * rate)
  ts = now
end
if ARGV[3] ~= '1' then
  if tokens >= capacity then
    return false
  end
  return tostring(tokens)
end
if tokens < 1 - 1e-9 then
  return {0, tostring(tokens)}
end
tokens = math.max(tokens - 1, 0)
redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', ts)
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) / rate))
return {1, tostring(tokens)}
"""


@final
class _RedisBuckets(_BucketMath):
    """Buckets as Redis hashes, changed by one atomic Lua script per check (``_LUA``)."""

    name: Final = "redis"

    def __init__(
        self,
        client: Redis,
        prefix: str,
        limit: int,
        window: float,
        *,
        owned: bool,
        fail_open: bool,
        outage: _Outage,
    ) -> None:
        from redis.exceptions import RedisError

        super().__init__(limit, window)
        self._client = client
        self._prefix = prefix
        self._window_ms = window * 1000.0
        self._owned = owned
        self._fail_open = fail_open
        self._outage = outage
        self._closed = False
        self._errors = (RedisError, OSError)
        # EVALSHA, loading the script again on NOSCRIPT (after a server restart).
        self._script = client.register_script(_LUA)

    def tracked(self) -> None:
        return None

    def _down(self) -> RateDecision:
        if self._fail_open:
            return RateDecision(
                allowed=True,
                limit=self.limit,
                remaining=self.limit - 1,
                retry_after=0.0,
                reset_in=0.0,
            )
        wait = self._outage.probe_interval or 1.0
        return RateDecision(
            allowed=False, limit=self.limit, remaining=0, retry_after=wait, reset_in=wait
        )

    async def _eval(self, session: str, take: int) -> tuple[bool, object]:
        """``(True, the script's reply)``, or ``(False, None)`` when Redis is unreachable."""
        if self._closed:
            raise RuntimeError("the rate limiter is closed")
        if self._outage.skip():
            return False, None
        try:
            reply = await self._script(
                keys=[self._prefix + session], args=[self.limit, self._window_ms, take]
            )
        except self._errors as exc:
            verdict = "allowing" if self._fail_open else "refusing"
            self._outage.failed(exc, f"{verdict} every request")
            return False, None
        self._outage.succeeded()
        return True, reply

    async def take(self, session: str) -> bool:
        return (await self.decide(session)).allowed

    async def decide(self, session: str) -> RateDecision:
        ok, reply = await self._eval(session, 1)
        if not ok:
            return self._down()
        allowed, tokens = cast("list[int | bytes]", reply)  # the script's {allowed, tokens}
        return self._decision(allowed == 1, self.limit - float(tokens))

    async def usage(self, session: str) -> UsageInfo | None:
        ok, reply = await self._eval(session, 0)
        if not ok or reply is None:  # unreachable, or a full bucket
            return None
        return self._usage(self.limit - float(cast("bytes", reply)))

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            if self._owned:
                await self._client.aclose()

    def __del__(self) -> None:
        if self._owned and not getattr(self, "_closed", True):
            warnings.warn(
                "RateLimiter on Redis was not closed: use `async with` or `await .aclose()`",
                ResourceWarning,
                source=self,
                stacklevel=1,
            )
