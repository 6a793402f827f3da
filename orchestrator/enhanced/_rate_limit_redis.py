"""The Redis rate-limiter backend: a hash per session, changed by one atomic Lua script."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Final, cast, final

from orchestrator.enhanced._rate_limit_local import BucketMath
from orchestrator.enhanced._rate_types import RateDecision
from orchestrator.enhanced._redis import DOWN, RedisClientOwner
from orchestrator.enhanced._redis_batch import batcher_for

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from orchestrator.enhanced._rate_types import UsageInfo
    from orchestrator.enhanced._redis import Outage

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
class RedisBuckets(BucketMath, RedisClientOwner):
    """Buckets as Redis hashes, changed by one atomic Lua script per check (``_LUA``)."""

    name: Final = "redis"
    _unclosed_warning = "RateLimiter on Redis was not closed: use `async with` or `await .aclose()`"

    def __init__(
        self,
        client: Redis,
        prefix: str,
        limit: int,
        window: float,
        *,
        owned: bool,
        fail_open: bool,
        outage: Outage,
    ) -> None:
        super().__init__(limit, window)
        self._client = client
        self._prefix = prefix
        self._window_ms = window * 1000.0
        self._owned = owned
        self._fail_open = fail_open
        self._outage = outage
        self._closed = False
        # EVALSHA in the batch of concurrent calls, loading the script on NOSCRIPT (the
        # first call, and after a server restart).
        self._batch = batcher_for(client)
        self._sha = hashlib.sha1(_LUA.encode()).hexdigest()
        from redis.exceptions import NoScriptError  # installed: the client is redis-py's

        self._no_script = NoScriptError

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
        reply = await self._outage.call(self._run, self._prefix + session, take)
        if reply is DOWN:
            return False, None
        return True, reply

    async def _run(self, key: str, take: int) -> object:
        command = ("EVALSHA", self._sha, 1, key, self.limit, self._window_ms, take)
        try:
            return await self._batch.execute(*command)
        except self._no_script:
            await self._client.script_load(_LUA)
            return await self._batch.execute(*command)

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
