"""Exceptions raised by orchestrator.

::

    OrchestratorError
    ├── Overloaded          a bounded channel is full: .stage .retry_after       -> 503
    │   └── QueueFull       PriorityQueue.push at capacity
    ├── PipelineClosed      submit() after shutdown began                        -> 503
    ├── RateLimited         .limit .remaining .retry_after .reset_in (seconds)   -> 429
    ├── RequestTimeout      the request's deadline passed (also a TimeoutError)
    ├── RequestCancelled    the request was cancelled by its caller
    ├── StageError          a pluggable hook (retriever, template, ...) raised: .stage
    ├── InvalidRequest      submit() refuses the request (also a ValueError)     -> 400
    ├── BackendUnavailable  a backend (Redis) did not answer: .backend
    └── InferenceError      the worker failed: .worker .status_code .retryable .retry_after
        └── CircuitOpen     the breaker refused the call without trying: .retry_after

Every attribute is a plain value (``str``, ``int``, ``float``, ``bool`` or ``None``) and the
message is ``str(exc)``: each error survives ``pickle`` with both, and
``orchestrator._errors_wire`` turns it into JSON and back for another process.
``retry_after`` is always the seconds until trying again may succeed.
"""

from __future__ import annotations

from typing import Any, TypeVar

__all__ = [
    "BackendUnavailable",
    "CircuitOpen",
    "InferenceError",
    "InvalidRequest",
    "OrchestratorError",
    "Overloaded",
    "PipelineClosed",
    "QueueFull",
    "RateLimited",
    "RequestCancelled",
    "RequestTimeout",
    "StageError",
]


class OrchestratorError(Exception):
    """Base class of every error this library raises on purpose."""

    def __reduce__(self) -> tuple[Any, ...]:
        # BaseException pickles as ``cls(*self.args)`` and then sets ``__dict__``: that
        # calls ``__init__`` with the message alone, which fails for every subclass whose
        # constructor takes keyword-only data. Rebuild without ``__init__`` instead: the
        # message (``args``) and the attributes (``__dict__``) come back exactly.
        return (_rebuild, (type(self), self.args), self.__dict__)


_E = TypeVar("_E", bound=OrchestratorError)


def _rebuild(cls: type[_E], args: tuple[object, ...]) -> _E:
    """Unpickle: an instance with ``args`` (the message), its ``__dict__`` set after."""
    return cls.__new__(cls, *args)


class Overloaded(OrchestratorError):
    """Raised when a bounded channel is full and the request is shed.

    ``submit`` raises it at admission instead of queueing without bound; a request already
    accepted ends ``failed`` with it when a higher-priority arrival displaces it.

    Attributes:
        stage: The stage whose channel was full (``"rag"`` at admission).
        retry_after: Seconds until trying again may succeed (a hint).
    """

    def __init__(self, message: str, *, stage: str = "rag", retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.stage = stage
        self.retry_after = retry_after


class QueueFull(Overloaded):
    """Raised by ``PriorityQueue.push`` when the queue is at capacity."""

    def __init__(
        self, message: str = "priority queue is full", *, stage: str = "inference"
    ) -> None:
        super().__init__(message, stage=stage)


class PipelineClosed(OrchestratorError):
    """Raised by ``submit`` once shutdown has begun, and given to requests it could not finish."""


class RateLimited(OrchestratorError):
    """Raised by ``submit`` when the session has used its quota for the window.

    Attributes:
        session: The session that is limited.
        limit: Requests allowed per window (the bucket's capacity).
        remaining: Requests left in the window (0 when limited).
        retry_after: Seconds until the next request will be admitted (``Retry-After``).
        reset_in: Seconds until the whole quota is back, the bucket full again
            (``X-RateLimit-Reset``); at least ``retry_after``.

    Example:
        >>> RateLimited("u1", limit=3, remaining=0, retry_after=20.0, reset_in=60.0)
        RateLimited('session u1 is rate limited, retry in 20.0s')
    """

    def __init__(
        self, session: str, *, limit: int, remaining: int, retry_after: float, reset_in: float
    ) -> None:
        super().__init__(f"session {session} is rate limited, retry in {retry_after:.1f}s")
        self.session = session
        self.limit = limit
        self.remaining = remaining
        self.retry_after = retry_after
        self.reset_in = reset_in


class RequestTimeout(OrchestratorError, TimeoutError):
    """Raised by ``Ticket.result()`` when the request's deadline passed before it finished."""


class RequestCancelled(OrchestratorError):
    """Raised by ``Ticket.result()`` when the request was cancelled with ``Ticket.cancel()``."""


class StageError(OrchestratorError):
    """Raised when a pluggable stage hook failed; the hook's exception is the ``__cause__``.

    Attributes:
        stage: The stage whose hook raised (``"rag"``, ``"assemble"``, ``"post"``, ``"stream"``).
    """

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"{stage} stage failed: {message}")
        self.stage = stage


class InvalidRequest(OrchestratorError, ValueError):
    """Raised by ``submit`` when it refuses a request's content: an unknown
    ``meta["priority"]``, or a request id already in use.

    Also a ``ValueError``, which ``submit`` raised for these before; a server answers it
    with 400.
    """


class BackendUnavailable(OrchestratorError):
    """Raised when a backend did not answer at all: ``CacheLayer.new_redis`` and
    ``RateLimiter.new_redis`` with ``ping=True`` (the default) when Redis does not answer
    ``PING``; the backend's own error is the ``__cause__``.

    An outage after that is not an error: the cache misses and the limiter fails open.

    Attributes:
        backend: What did not answer (``"redis"``).
    """

    def __init__(self, message: str, *, backend: str = "redis") -> None:
        super().__init__(message)
        self.backend = backend


class InferenceError(OrchestratorError):
    """Raised when a model worker fails: a provider error, a timeout, a malformed response.

    Attributes:
        worker: A short name of the worker (``"openai"``, ``"echo"``, ...), or ``None``.
        status_code: The provider's HTTP status code, when there was one.
        retryable: Whether trying again may succeed (timeouts, 429, 5xx).
        retry_after: Seconds until trying again may succeed, when the provider said.
    """

    def __init__(
        self,
        message: str,
        *,
        worker: str | None = None,
        status_code: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.worker = worker
        self.status_code = status_code
        self.retryable = retryable
        self.retry_after = retry_after


class CircuitOpen(InferenceError):
    """Raised when the circuit breaker is open and a worker call is refused without trying.

    An ``InferenceError`` (never ``retryable``: a retry would be refused the same way), so a
    request refused by the breaker ends ``failed`` like any other inference failure.

    Attributes:
        retry_after: Seconds until the breaker lets a probe call through (0.0 when it is
            half-open and waits for the probes in flight).
    """

    retry_after: float

    def __init__(self, message: str, *, retry_after: float, worker: str | None = None) -> None:
        super().__init__(message, worker=worker, retryable=False, retry_after=retry_after)

    @property
    def retry_in(self) -> float:
        """Deprecated: the old name of ``retry_after``, kept for reading only."""
        return self.retry_after
