"""Exceptions raised by orchestrator.

::

    OrchestratorError
    ├── Overloaded        admission refused, a bounded channel is full       -> 503
    │   └── QueueFull     PriorityQueue.push at capacity
    ├── PipelineClosed    submit() after shutdown began                      -> 503
    ├── RateLimited       .limit .remaining .reset_in (seconds)              -> 429
    ├── RequestTimeout    the request's deadline passed (also a TimeoutError)
    ├── RequestCancelled  the request was cancelled by its caller
    ├── StageError        a pluggable hook (retriever, template, ...) raised: .stage
    ├── CircuitOpen       the circuit breaker refuses calls to a failing worker
    └── InferenceError    the worker failed: .worker .status_code .retryable -> ticket ``failed``
"""

from __future__ import annotations

__all__ = [
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


class Overloaded(OrchestratorError):
    """Raised when a bounded channel is full and the request is shed.

    ``submit`` raises it at admission instead of queueing without bound; a request already
    accepted ends ``failed`` with it when a higher-priority arrival displaces it.

    Attributes:
        stage: The stage whose channel was full (``"rag"`` at admission).
        retry_after: A hint, in seconds, for when to try again.
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


class InvalidRequest(OrchestratorError, ValueError):
    """Raised by ``submit`` for a request it cannot take as it is: an unknown priority, an
    id already in use. Also a ``ValueError``."""


class PipelineClosed(OrchestratorError):
    """Raised by ``submit`` once shutdown has begun, and given to requests it could not finish."""


class RateLimited(OrchestratorError):
    """Raised by ``submit`` when the session has used its quota for the window.

    Attributes:
        session: The session that is limited.
        limit: Requests allowed per window.
        remaining: Requests left in the window (0 when limited).
        reset_in: Seconds until a request will be admitted again.
    """

    def __init__(self, session: str, *, limit: int, remaining: int, reset_in: float) -> None:
        super().__init__(f"session {session} is rate limited, retry in {reset_in:.1f}s")
        self.session = session
        self.limit = limit
        self.remaining = remaining
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


class InferenceError(OrchestratorError):
    """Raised when a model worker fails: a provider error, a timeout, a malformed response.

    Attributes:
        worker: A short name of the worker (``"openai"``, ``"echo"``, ...), or ``None``.
        status_code: The provider's HTTP status code, when there was one.
        retryable: Whether trying again may succeed (timeouts, 429, 5xx).
        retry_after: Seconds the provider asked us to wait, when it said.
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

    Attributes:
        retry_in: Seconds until the breaker lets a probe call through.
    """

    def __init__(self, message: str, *, retry_in: float, worker: str | None = None) -> None:
        super().__init__(message, worker=worker, retryable=False, retry_after=retry_in)
        self.retry_in = retry_in
