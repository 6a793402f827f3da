"""Retries with backoff for worker calls that failed in a way that may pass.

The n-th retry (n = 1, 2, ...) waits, before jitter and capped at ``max_delay``:

============  ===========================  ============================================
backoff       nominal delay                with ``jitter=True``
============  ===========================  ============================================
fixed         ``base_delay``               uniform in [delay / 2, delay] ("equal")
linear        ``base_delay * n``           uniform in [delay / 2, delay] ("equal")
exponential   ``base_delay * 2 ** (n-1)``  uniform in [0, delay] ("full jitter")
============  ===========================  ============================================

Full jitter spreads clients that failed together (a backend restart) over the whole
window, which is why it is the default for exponential backoff; fixed and linear keep at
least half their delay so that the schedule keeps its meaning. An error's ``retry_after``
(a provider's ``Retry-After``, ``Overloaded``'s hint) raises the wait to at least that much
(still capped at ``max_delay``).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from typing import TYPE_CHECKING, Final, TypeVar, final

from orchestrator import metrics
from orchestrator.errors import CircuitOpen, InferenceError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

__all__ = ["Backoff", "RetryPolicy", "default_retry_on"]

T = TypeVar("T")

logger = logging.getLogger(__name__)

_MAX_EXPONENT: Final = 1023  # 2.0 ** 1024 overflows; the cap is reached long before


class Backoff(enum.Enum):
    """How the delay grows from one retry to the next."""

    FIXED = "fixed"
    LINEAR = "linear"
    EXPONENTIAL = "exponential"

    @classmethod
    def parse(cls, value: Backoff | str) -> Backoff:
        """Parse ``"fixed"``, ``"linear"`` or ``"exponential"``, in any case.

        Raises:
            ValueError: For any other value.
        """
        if isinstance(value, Backoff):
            return value
        try:
            return cls(value.lower())
        except (ValueError, AttributeError):
            raise ValueError(
                f"unknown backoff {value!r}: expected one of fixed, linear, exponential"
            ) from None

    def __str__(self) -> str:
        return self.value


_FIXED: Final = Backoff.FIXED
_LINEAR: Final = Backoff.LINEAR
_EXPONENTIAL: Final = Backoff.EXPONENTIAL


def default_retry_on(exc: BaseException) -> bool:
    """The default ``retry_on``: an ``InferenceError`` that says ``retryable``.

    Workers set ``retryable`` for timeouts, connection errors, 408, 429 and 5xx.
    """
    return isinstance(exc, InferenceError) and exc.retryable


@final
class RetryPolicy:
    """Run a call up to ``max_attempts`` times, sleeping with backoff between attempts.

    Only exceptions ``retry_on`` accepts are retried; others, and the last attempt's, are
    raised unchanged (the same object). Cancellation and ``CircuitOpen`` are never
    retried, whatever ``retry_on`` says. A success on the first attempt costs a ``try``
    block: no task, no timer.

    Args:
        max_attempts: Attempts in all, the first included (>= 1; 1 never retries).
        backoff: ``Backoff`` or its name: ``"fixed"``, ``"linear"``, ``"exponential"``.
        base_delay: Seconds before the first retry, before jitter (>= 0).
        max_delay: Cap on any one delay, ``retry_after`` included (>= ``base_delay``).
        jitter: Randomize delays (see the module docstring for each backoff).
        retry_on: Which exceptions to retry; default ``default_retry_on``.
        sleep: Awaited with each delay; tests pass a fake that records delays.
        rng: Source of jitter; pass ``random.Random(seed)`` for repeatable delays.

    Example:
        >>> async def demo(worker: "ModelWorker") -> None:  # doctest: +SKIP
        ...     policy = RetryPolicy(max_attempts=4, backoff="exponential", base_delay=0.2)
        ...     tokens = await policy.call(lambda: worker.infer("Hi"), worker="openai")
        >>> list(RetryPolicy(max_attempts=4, base_delay=0.5, jitter=False).delays())
        [0.5, 1.0, 2.0]
    """

    __slots__ = (
        "_backoff",
        "_base_delay",
        "_jitter",
        "_max_attempts",
        "_max_delay",
        "_retry_on",
        "_rng",
        "_sleep",
    )

    def __init__(
        self,
        *,
        max_attempts: int = 3,
        backoff: Backoff | str = "exponential",
        base_delay: float = 0.1,
        max_delay: float = 10.0,
        jitter: bool = True,
        retry_on: Callable[[BaseException], bool] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if not 0.0 <= base_delay < float("inf"):
            raise ValueError(f"base_delay must be >= 0 seconds, got {base_delay}")
        if not base_delay <= max_delay < float("inf"):
            raise ValueError(f"max_delay must be >= base_delay ({base_delay}), got {max_delay}")
        self._max_attempts = max_attempts
        self._backoff = Backoff.parse(backoff)
        self._base_delay = float(base_delay)
        self._max_delay = float(max_delay)
        self._jitter = jitter
        self._retry_on = retry_on if retry_on is not None else default_retry_on
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()

    def __repr__(self) -> str:
        return (
            f"RetryPolicy(max_attempts={self._max_attempts}, backoff={str(self._backoff)!r}, "
            f"base_delay={self._base_delay}, max_delay={self._max_delay}, jitter={self._jitter})"
        )

    @property
    def max_attempts(self) -> int:
        """Attempts in all, the first included."""
        return self._max_attempts

    @property
    def backoff(self) -> Backoff:
        """How the delay grows."""
        return self._backoff

    # -- delays ----------------------------------------------------------------------------

    def nominal_delay(self, retry: int) -> float:
        """The delay before retry number ``retry`` (1-based), capped, before jitter."""
        base = self._base_delay
        kind = self._backoff
        if kind is _FIXED:
            delay = base
        elif kind is _LINEAR:
            delay = base * retry
        else:
            delay = base * 2.0 ** min(retry - 1, _MAX_EXPONENT)
        return min(delay, self._max_delay)

    def _delay(self, retry: int) -> float:
        delay = self.nominal_delay(retry)
        if not self._jitter:
            return delay
        if self._backoff is _EXPONENTIAL:
            return self._rng.uniform(0.0, delay)
        return self._rng.uniform(delay / 2, delay)

    def delays(self) -> Iterator[float]:
        """The planned delays, one per retry (``max_attempts - 1``), jitter drawn from ``rng``.

        A provider's ``retry_after`` is not known in advance and may lengthen a delay.
        """
        return (self._delay(retry) for retry in range(1, self._max_attempts))

    def should_retry(self, exc: BaseException) -> bool:
        """Whether ``exc`` is retried (attempts left permitting)."""
        return (
            isinstance(exc, Exception) and not isinstance(exc, CircuitOpen) and self._retry_on(exc)
        )

    # -- calling ---------------------------------------------------------------------------

    async def call(self, fn: Callable[[], Awaitable[T]], *, worker: str | None = None) -> T:
        """Await ``fn()``, retrying it per this policy.

        Args:
            fn: Makes one attempt; called afresh for each.
            worker: Label of ``orchestrator_retries_total``; default the error's
                ``worker`` attribute, else ``"unknown"``.

        Returns:
            What the first successful attempt returned.

        Raises:
            Exception: The last attempt's exception, or the first one not retried,
                unchanged.
        """
        retry = 0
        while True:
            try:
                return await fn()
            except Exception as exc:
                retry += 1
                if retry >= self._max_attempts or not self.should_retry(exc):
                    raise
                delay = self._delay(retry)
                retry_after = getattr(exc, "retry_after", None)
                if isinstance(retry_after, int | float) and retry_after > delay:
                    delay = min(float(retry_after), self._max_delay)
                label = worker or getattr(exc, "worker", None) or "unknown"
                metrics.RETRIES.labels(str(label)).inc()
                logger.info(
                    "retrying %s call in %.3fs (attempt %d of %d failed: %r)",
                    label,
                    delay,
                    retry,
                    self._max_attempts,
                    exc,
                )
            # Outside the except block, so a later error is not chained to this one.
            await self._sleep(delay)
