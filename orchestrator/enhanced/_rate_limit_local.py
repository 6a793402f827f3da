"""In-process rate-limiter backends: GCRA token buckets and one aiolimiter per session.

``BucketMath`` turns a bucket's level into ``RateDecision`` and ``UsageInfo`` for every
backend, the Redis one (``_rate_limit_redis``) included.
"""

from __future__ import annotations

import collections
import math
from typing import TYPE_CHECKING, Final, final

from aiolimiter import AsyncLimiter

from orchestrator.enhanced._rate_types import RateDecision, UsageInfo

if TYPE_CHECKING:
    from collections.abc import Callable

_SWEEP: Final = 8
"""Idle buckets dropped at most per check: bounded work, and more than one check adds."""

_EPS: Final = 1e-9
"""Relative slack for float comparisons (``3 * (1/3)`` is not always ``1.0``)."""


class BucketMath:
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
class TokenBuckets(BucketMath):
    """Token buckets as GCRA: per session, only the time ``tat`` at which it is full.

    With ``T = window / limit`` seconds per token, the level at ``now`` is
    ``(tat - now) / T``. A request is allowed while ``tat - now <= window - T`` (a token is
    left to take) and moves ``tat`` on by ``T``. Sessions are kept in order of their last
    allowed request; one allowed at ``t`` is full by ``t + window``, so the oldest are
    dropped first, as soon as they are full.
    """

    __slots__ = ("_clock", "_drops", "_interval", "_max_sessions", "_tats", "_tolerance")

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
        self._drops = _Drops()

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
        if dropped and self._drops.shrink(dropped, len(tats)):
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
class GovernorBuckets(BucketMath):
    """One ``aiolimiter.AsyncLimiter`` per session, in order of the last allowed request.

    aiolimiter is a leaky bucket: its level rises by one per acquisition and drains at
    ``limit / window`` per second, and a request fits while ``level + 1 <= limit``: the
    same arithmetic as the token bucket. A limiter drained to 0 is a fresh one, dropped.
    """

    __slots__ = ("_drops", "_limiters", "_max_sessions")

    name: Final = "governor"

    def __init__(self, limit: int, window: float, max_sessions: int | None) -> None:
        super().__init__(limit, window)
        self._max_sessions = max_sessions
        self._limiters: collections.OrderedDict[str, AsyncLimiter] = collections.OrderedDict()
        self._drops = _Drops()

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
        if dropped and self._drops.shrink(dropped, len(limiters)):
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


@final
class _Drops:
    """Counts dropped buckets; says when the table should be copied to a smaller one.

    A dict never shrinks as keys leave, so after a flood of sessions its table would stay
    at the peak size. Copying once drops outnumber the live buckets 4 to 1 costs O(live),
    paid for by those drops: amortised O(1) per bucket.
    """

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def shrink(self, dropped: int, size: int) -> bool:
        self.count += dropped
        if self.count <= 4 * size + 1024:
            return False
        self.count = 0
        return True


def _level(limiter: AsyncLimiter) -> float:
    # aiolimiter has no public accessor for its level; 1.0 to 1.3 keep it in ``_level``,
    # drained to now by the has_capacity()/acquire() just before. A test pins this.
    level: float = limiter._level  # noqa: SLF001 - aiolimiter's, read-only, pinned by a test
    return level
