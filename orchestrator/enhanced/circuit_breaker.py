"""A circuit breaker: stop calling a worker that keeps failing, probe it, resume when healthy.

::

    CLOSED ──(failure_threshold consecutive failures)──► OPEN ──(open_timeout)──► HALF_OPEN
       ▲                                                   ▲                          │
       └──(half_open_max_calls probes, success fraction ≥ success_threshold)──────────┤
                                                           └──(too many failed probes)┘

While open, calls fail fast with ``CircuitOpen`` (its ``retry_after`` says when a probe
will be let through). Only the backend's health counts: a 4xx other than 408 and 429 is the
client's fault, and a cancelled call says nothing about the backend.
"""

from __future__ import annotations

import enum
import logging
import time
from typing import TYPE_CHECKING, Final, TypeVar, final

from orchestrator import metrics
from orchestrator.errors import CircuitOpen, InferenceError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from contextlib import AbstractAsyncContextManager
    from types import TracebackType

__all__ = ["CircuitBreaker", "CircuitState", "default_is_failure"]

T = TypeVar("T")

logger = logging.getLogger(__name__)


class CircuitState(enum.Enum):
    """The breaker's state; ``metrics.CIRCUIT_STATE`` exports it as 0, 1 and 2."""

    CLOSED = "closed"
    """Calls go through; consecutive failures are counted."""
    HALF_OPEN = "half_open"
    """A limited number of probe calls go through; their outcome closes or reopens it."""
    OPEN = "open"
    """Calls fail fast with ``CircuitOpen`` until ``open_timeout`` passes."""

    def __str__(self) -> str:
        return self.value


_CLOSED: Final = CircuitState.CLOSED
_HALF_OPEN: Final = CircuitState.HALF_OPEN
_OPEN: Final = CircuitState.OPEN
_GAUGE: Final = {_CLOSED: 0.0, _HALF_OPEN: 1.0, _OPEN: 2.0}


def default_is_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the backend is unhealthy: the default ``is_failure``.

    Every ``Exception`` counts except a ``CircuitOpen`` (no call was made) and an
    ``InferenceError`` whose status code is a 4xx other than 408 (timeout) and 429 (too
    many requests): those are the client's fault. A ``BaseException`` that is not an
    ``Exception`` (cancellation) never reaches this function.
    """
    if isinstance(exc, CircuitOpen):
        return False
    if isinstance(exc, InferenceError):
        code = exc.status_code
        if code is not None and 400 <= code < 500 and code != 408 and code != 429:
            return False
    return True


@final
class CircuitBreaker:
    """Fail fast while a backend is failing, and let a few probe calls find out when it heals.

    Closed, it counts consecutive failures (a success resets the count) and opens at
    ``failure_threshold``. Open, every call raises ``CircuitOpen`` at once until
    ``open_timeout`` seconds have passed; then it is half-open and lets
    ``half_open_max_calls`` probe calls through. When all of them have finished and at
    least ``success_threshold`` of them succeeded it closes; as soon as too many failed for
    that fraction to be reached it opens again for another ``open_timeout``.

    Outcomes ``is_failure`` rejects (a 4xx, by default) and cancellations are neutral: they
    neither count as failures nor reset the count, and a neutral probe frees its slot for
    another. Each transition is logged (opening at warning, the rest at info) and exported
    on ``metrics.CIRCUIT_STATE`` under ``name`` (0 closed, 1 half-open, 2 open); breakers
    sharing a name share that series.

    A call that started in an earlier state (a slow call begun while closed that ends while
    half-open) does not count in the current one, provided the token ``before_call()``
    returned is handed back to ``record_success``/``record_failure``; ``call`` and
    ``guard`` do this. Single-threaded asyncio needs no lock: no method awaits.

    Args:
        failure_threshold: Consecutive failures that open a closed breaker (>= 1).
        success_threshold: Fraction of the half-open probes that must succeed to close
            it, in (0, 1].
        half_open_max_calls: Probe calls let through while half-open (>= 1).
        open_timeout: Seconds an open breaker refuses calls before it probes (>= 0).
        name: Label of the breaker in metrics, logs and ``CircuitOpen.worker``.
        is_failure: Decides which exceptions count as failures; default
            ``default_is_failure``. Cancellation never reaches it and never counts.
        clock: Monotonic time source in seconds, for tests.

    Example:
        >>> async def demo(worker: "ModelWorker") -> None:  # doctest: +SKIP
        ...     breaker = CircuitBreaker(failure_threshold=5, open_timeout=30.0, name="openai")
        ...     tokens = await breaker.call(lambda: worker.infer("Hi"))  # or CircuitOpen
        ...     async with breaker.guard():  # the same, around a block (a stream)
        ...         async for token in worker.stream("Hi"):
        ...             print(token, end="")
    """

    __slots__ = (
        "_clock",
        "_epoch",
        "_failure_threshold",
        "_failures",
        "_half_open_max_calls",
        "_is_failure",
        "_name",
        "_open_timeout",
        "_open_until",
        "_probe_failures",
        "_probe_successes",
        "_probes",
        "_state",
        "_success_threshold",
    )

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        success_threshold: float = 0.8,
        half_open_max_calls: int = 5,
        open_timeout: float = 60.0,
        name: str = "default",
        is_failure: Callable[[BaseException], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if not 0.0 < success_threshold <= 1.0:
            raise ValueError(f"success_threshold must be in (0, 1], got {success_threshold}")
        if half_open_max_calls < 1:
            raise ValueError(f"half_open_max_calls must be >= 1, got {half_open_max_calls}")
        if not 0.0 <= open_timeout < float("inf"):
            raise ValueError(f"open_timeout must be >= 0 seconds, got {open_timeout}")
        self._failure_threshold = failure_threshold
        self._success_threshold = success_threshold
        self._half_open_max_calls = half_open_max_calls
        self._open_timeout = open_timeout
        self._name = name
        self._is_failure = is_failure if is_failure is not None else default_is_failure
        self._clock = clock
        self._state = _CLOSED
        self._epoch = 0  # bumped on every transition: tokens of earlier states are stale
        self._failures = 0  # consecutive, while closed
        self._open_until = 0.0
        self._probes = 0  # half-open probes in flight
        self._probe_successes = 0
        self._probe_failures = 0
        metrics.CIRCUIT_STATE.set((name,), _GAUGE[_CLOSED])

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self._name!r} {self._state}>"

    # -- inspection ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The breaker's label in metrics and logs."""
        return self._name

    @property
    def state(self) -> CircuitState:
        """The current state; an open breaker whose ``open_timeout`` passed turns half-open."""
        if self._state is _OPEN and self._clock() >= self._open_until:
            self._half_open()
        return self._state

    @property
    def failures(self) -> int:
        """Consecutive failures counted while closed."""
        return self._failures

    # -- the explicit protocol -------------------------------------------------------------

    def before_call(self) -> int:
        """Ask to make a call; pair it with ``record_success`` or ``record_failure``.

        Returns:
            A token naming the state the call started in; pass it to ``record_*``.

        Raises:
            CircuitOpen: The breaker is open, or half-open with every probe slot taken.
        """
        if self._state is _CLOSED:
            return self._epoch
        if self._state is _OPEN:
            left = self._open_until - self._clock()
            if left > 0:
                raise CircuitOpen(
                    f"circuit breaker {self._name!r} is open, retry in {left:.1f}s",
                    retry_after=left,
                    worker=self._name,
                )
            self._half_open()
        taken = self._probes + self._probe_successes + self._probe_failures
        if taken >= self._half_open_max_calls:
            raise CircuitOpen(
                f"circuit breaker {self._name!r} is half-open and its "
                f"{self._half_open_max_calls} probe calls are taken",
                retry_after=0.0,  # unknown: when the probes finish it closes or reopens
                worker=self._name,
            )
        self._probes += 1
        return self._epoch

    def record_success(self, token: int | None = None) -> None:
        """Record that a call admitted by ``before_call`` succeeded.

        Args:
            token: What ``before_call`` returned; a call from an earlier state is ignored.
                ``None`` counts the call in the current state.
        """
        if token is not None and token != self._epoch:
            return
        state = self._state
        if state is _CLOSED:
            self._failures = 0
        elif state is _HALF_OPEN and self._probes > 0:
            self._probes -= 1
            self._probe_successes += 1
            self._decide()

    def record_failure(self, exc: BaseException, token: int | None = None) -> None:
        """Record that a call admitted by ``before_call`` raised ``exc``.

        A cancellation, or an exception ``is_failure`` rejects, is neutral: it frees a
        half-open probe slot and changes no count.

        Args:
            exc: What the call raised.
            token: What ``before_call`` returned; a call from an earlier state is ignored.
                ``None`` counts the call in the current state.
        """
        if token is not None and token != self._epoch:
            return
        state = self._state
        if not isinstance(exc, Exception) or not self._is_failure(exc):
            if state is _HALF_OPEN and self._probes > 0:
                self._probes -= 1
            return
        if state is _CLOSED:
            self._failures += 1
            if self._failures >= self._failure_threshold:
                self._open(f"{self._failures} consecutive failures, the last {exc!r}")
        elif state is _HALF_OPEN and self._probes > 0:
            self._probes -= 1
            self._probe_failures += 1
            self._decide()

    # -- wrappers --------------------------------------------------------------------------

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Await ``fn()`` through the breaker: the cheapest form (no task, no extra object).

        Returns:
            What ``fn()`` returned.

        Raises:
            CircuitOpen: Refused without calling ``fn``.
            BaseException: Whatever ``fn()`` raised, unchanged, after recording it.
        """
        # The closed path inlines before_call/record_success: this runs on every request.
        token = self._epoch if self._state is _CLOSED else self.before_call()
        try:
            result = await fn()
        except BaseException as exc:
            self.record_failure(exc, token)
            raise
        if self._state is _CLOSED and token == self._epoch:
            self._failures = 0
        else:
            self.record_success(token)
        return result

    def guard(self) -> AbstractAsyncContextManager[None]:
        """``async with breaker.guard():`` runs a block as one call (e.g. a whole stream).

        Entering raises ``CircuitOpen`` when refused; leaving records the block's outcome
        and lets its exception propagate.
        """
        return _Guard(self)

    # -- transitions -----------------------------------------------------------------------

    def _decide(self) -> None:
        n = self._half_open_max_calls
        if (n - self._probe_failures) / n < self._success_threshold:
            self._open(f"{self._probe_failures} of {n} probe calls failed", reopen=True)
        elif self._probe_successes + self._probe_failures >= n:
            self._set(_CLOSED)
            self._failures = 0
            logger.info(
                "circuit breaker %r closed: %d of %d probe calls succeeded",
                self._name,
                self._probe_successes,
                n,
            )

    def _open(self, why: str, *, reopen: bool = False) -> None:
        self._open_until = self._clock() + self._open_timeout
        self._set(_OPEN)
        logger.warning(
            "circuit breaker %r %s (%s); refusing calls for %.1fs",
            self._name,
            "reopened" if reopen else "opened",
            why,
            self._open_timeout,
        )

    def _half_open(self) -> None:
        self._probes = self._probe_successes = self._probe_failures = 0
        self._set(_HALF_OPEN)
        logger.info(
            "circuit breaker %r half-open: letting %d probe calls through",
            self._name,
            self._half_open_max_calls,
        )

    def _set(self, state: CircuitState) -> None:
        self._state = state
        self._epoch += 1
        metrics.CIRCUIT_STATE.set((self._name,), _GAUGE[state])


@final
class _Guard:
    __slots__ = ("_breaker", "_token")

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker
        self._token = 0

    async def __aenter__(self) -> None:
        self._token = self._breaker.before_call()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self._breaker.record_success(self._token)
        else:
            self._breaker.record_failure(exc, self._token)
