"""``Ticket``: the caller's handle on one submitted request."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, final

from orchestrator._seams import RequestStore, TokenStream
from orchestrator.types import RequestStatus

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from orchestrator._seams import RequestRecord
    from orchestrator.enhanced.rate_limit import RateDecision
    from orchestrator.types import PromptRequest

__all__ = ["Ticket"]

_COMPLETED = RequestStatus.COMPLETED


class Canceller(Protocol):
    """How a ticket asks for its request to end (the pipeline that owns it)."""

    async def cancel(self, request_id: str) -> bool: ...

    def cancel_nowait(self, request_id: str) -> bool: ...


class _Seams(RequestStore, TokenStream, Protocol):
    """A store that keeps the tokens too."""


@final
class Ticket:
    """A submitted request: its id, its status, its tokens as they come, and its result.

    A read-only view of the request's record: it reads the request store and the token
    stream, and changes nothing but asks (``cancel``). Every accepted request ends in
    exactly one terminal status (completed, failed, timeout, cancelled). The work belongs
    to the pipeline, not to whoever waits: cancelling a task that awaits ``result()`` ends
    only that wait; ``cancel()`` ends the request.

    Example:
        >>> async def demo(handles: "PipelineHandles") -> None:  # doctest: +SKIP
        ...     ticket = await handles.submit(PromptRequest("u1", "Hi"), stream=True)
        ...     async for token in ticket.tokens():
        ...         print(token, end="")
        ...     print(await ticket.result())
    """

    __slots__ = ("_canceller", "_rate", "_record", "_store")

    def __init__(
        self,
        record: RequestRecord,
        store: _Seams,
        canceller: Canceller,
        rate: RateDecision | None = None,
    ) -> None:
        self._record = record
        self._store = store
        self._canceller = canceller
        self._rate = rate

    def __repr__(self) -> str:
        return f"<Ticket {self._record.id} {self._record.status.value}>"

    def __eq__(self, other: object) -> bool:
        """Tickets are views: two of the same request are equal."""
        if not isinstance(other, Ticket):
            return NotImplemented
        return self._record.id == other._record.id

    def __hash__(self) -> int:
        return hash(self._record.id)

    # -- what callers read -----------------------------------------------------------------

    @property
    def request_id(self) -> str:
        """The request's id (a uuid4 string unless the request named one)."""
        return self._record.id

    @property
    def request(self) -> PromptRequest:
        """The request as submitted."""
        return self._record.request

    @property
    def status(self) -> RequestStatus:
        """pending (queued), processing (the worker is producing it), or a terminal status."""
        return self._record.status

    def done(self) -> bool:
        """Whether the request reached its terminal status."""
        return self._record.finished_at is not None

    @property
    def text(self) -> str | None:
        """The result text once completed, else ``None``."""
        return self._record.result

    @property
    def error(self) -> BaseException | None:
        """Why the request failed, timed out or was cancelled; ``None`` otherwise."""
        return self._record.error

    @property
    def token_count(self) -> int:
        """Tokens produced so far."""
        return self._record.token_count

    @property
    def rate_limit(self) -> RateDecision | None:
        """The rate limiter's decision that admitted the request (its limit, what remains
        of the session's quota, when it is full again); ``None`` without a limiter, or for
        a ticket found by id."""
        return self._rate

    @property
    def created_at(self) -> float:
        """When it was submitted (``time.time()``)."""
        return self._record.created_at

    @property
    def finished_at(self) -> float | None:
        """When it finished (``time.time()``), or ``None``."""
        return self._record.finished_at

    # -- waiting ---------------------------------------------------------------------------

    async def wait(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait until the request finishes, at most ``timeout`` seconds.

        Returns:
            Whether it finished. Cancelling the waiting task ends only this wait.
        """
        if self._record.finished_at is None:
            record = await self._store.wait(self._record.id, timeout)
            if record is not None:
                self._record = record
        return self._record.finished_at is not None

    async def result(self) -> str:
        """Wait for the request and return its text.

        Raises:
            InferenceError: The worker failed (or another ``OrchestratorError`` that made
                the request fail, such as ``Overloaded`` or ``StageError``).
            RequestTimeout: The request's deadline passed.
            RequestCancelled: The request was cancelled.
        """
        record = self._record
        if record.finished_at is None:
            record = await self._store.wait(record.id, None) or record
            self._record = record
        if record.status is _COMPLETED:
            return record.result  # type: ignore[return-value]
        raise record.error  # type: ignore[misc]

    async def tokens(self) -> AsyncIterator[str]:
        """Yield every token of the output from the first, as the worker produces them.

        Iteration may start at any time, even after the request finished. Tokens arrive
        one by one as the model emits them when the request was submitted with
        ``stream=True``; otherwise they all arrive when the worker's answer does. Tokens
        are the worker's raw output; ``result()`` is the text after post-processing.

        Raises:
            The request's error (as ``result()``) after the tokens it produced, if it did
            not complete.
        """
        async for batch in self.token_batches():
            for token in batch:
                yield token

    async def token_batches(self) -> AsyncIterator[Sequence[str]]:
        """Yield the tokens of ``tokens()`` in batches: each batch holds every token that had
        arrived and was not yet yielded when the iteration looked (never an empty one).

        For relaying tokens to a client: a relay that falls behind a fast model catches
        up in one step and can send the batch in one write, while a lone token still goes
        out alone, at once. Joined, the batches are exactly ``tokens()``.

        Raises:
            The request's error (as ``result()``) after the tokens it produced, if it did
            not complete.
        """
        async for batch in self._store.read_token_batches(self._record.id):
            yield batch
        await self.wait()
        if self._record.status is not _COMPLETED:
            error = self._record.error
            assert error is not None
            raise error

    # -- asking ----------------------------------------------------------------------------

    async def cancel(self) -> bool:
        """End the request as ``cancelled`` wherever it is, and wait for its worker call
        (if one was in flight) to unwind.

        Returns:
            ``True`` if this call cancelled it, ``False`` if it had already finished.
        """
        return await self._canceller.cancel(self._record.id)

    def cancel_nowait(self) -> bool:
        """End the request as ``cancelled`` and ask its worker call to stop, without
        waiting: like ``asyncio.Task.cancel()``, the request is over when this returns,
        the call unwinds soon after.

        Returns:
            ``True`` if this call cancelled it, ``False`` if it had already finished.
        """
        return self._canceller.cancel_nowait(self._record.id)
