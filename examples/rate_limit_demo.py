"""Per-session rate limits: a burst, a refusal with its 429 headers, then the refill.

python examples/rate_limit_demo.py                               # in process
REDIS_URL=redis://localhost:6379/0 python examples/rate_limit_demo.py  # shared budget
"""

from __future__ import annotations

import asyncio
import math
import os

from orchestrator.enhanced.rate_limit import RateDecision, RateLimiter


def headers(decision: RateDecision) -> dict[str, str]:
    """The HTTP headers of a decision, as the server sends them with a 429."""
    out = {
        "X-RateLimit-Limit": str(decision.limit),
        "X-RateLimit-Remaining": str(decision.remaining),
        "X-RateLimit-Reset": str(math.ceil(decision.reset_in)),
    }
    if not decision.allowed:
        out["Retry-After"] = str(math.ceil(decision.retry_after))
    return out


async def main() -> None:
    url = os.environ.get("REDIS_URL")
    if url:
        # Two limiters on one prefix stand for two server replicas: one budget.
        first = await RateLimiter.new_redis(url, 5, 2, prefix="rate-demo:")
        second = await RateLimiter.new_redis(url, 5, 2, prefix="rate-demo:")
    else:
        first = RateLimiter(5, 2)  # 5 requests, refilled over 2 seconds
        second = first
    async with first, second:
        for i in range(7):
            limiter = first if i % 2 == 0 else second
            decision = await limiter.decide("user-123")
            verdict = "allowed" if decision.allowed else "429"
            print(f"request {i + 1}: {verdict:7} {headers(decision)}")
        print("usage:", await first.get_usage("user-123"))
        refused = await first.decide("user-123")
        await asyncio.sleep(refused.retry_after)  # a client honouring Retry-After
        print("after Retry-After:", (await first.decide("user-123")).allowed)
        print("another session is unaffected:", await first.check("user-456"))


if __name__ == "__main__":
    asyncio.run(main())
