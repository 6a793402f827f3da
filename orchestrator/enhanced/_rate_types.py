"""The values a rate limiter answers with, apart from ``rate_limit`` so that its backends
(``_rate_limit_local``, ``_rate_limit_redis``) build them without importing it.

``orchestrator.enhanced.rate_limit`` re-exports both: import them from there.
"""

from __future__ import annotations

import attrs

__all__ = ["RateDecision", "UsageInfo"]


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
