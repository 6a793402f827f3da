"""``Ticket``: the caller's handle on one submitted request."""

from __future__ import annotations

import array
import asyncio
import math
import time
from typing import TYPE_CHECKING, final

from orchestrator.errors import RequestCancelled, RequestTimeout
from orchestrator.types import RequestStatus

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

    from orchestrator.enhanced.priority import Priority
    from orchestrator.types import PromptRequest

__all__ = ["Ticket"]

_PENDING = RequestStatus.PENDING
_PROCESSING = RequestStatus.PROCESSING
_COMPLETED = RequestStatus.COMPLETED
_FAILED = RequestStatus.FAILED
_TIMEOUT = RequestStatus.TIMEOUT
_CANCELLED = RequestStatus.CANCELLED

_CANCEL_GRACE = 5.0  # seconds cancel() waits for a worker call to unwind
_COMPACT_AFTER = 64  # tokens: a finished ticket with more keeps them as one string
_RECORD_OVERHEAD = 512  # bytes a finished ticket costs beyond its text (estimated)


@final
class _TokenLog:
    """A finished request's tokens as one string and where each ends: replays exactly
    like the list it replaces, for a fraction of its memory (a Python ``str`` per token
    costs ~50 bytes beyond its text)."""

    __slots__ = ("_ends", "text")

    def __init__(self, tokens: list[str], result: str | None) -> None:
        text = "".join(tokens)
        self.text = result if text == result else text  # share the result when equal
        ends = array.array("I" if len(text) < 2**32 else "q")
        end = 0
        for token in tokens:
            end += len(token)
            ends.append(end)
        self._ends = ends

    def __len__(self) -> int:
        return len(self._ends)

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self._ends)))

    def __getitem__(self, index: int) -> str:
        start = self._ends[index - 1] if index else 0
        return self.text[start : self._ends[index]]

    def nbytes(self, result: str | None) -> int:
        shared = self.text is result
        return self._ends.itemsize * len(self._ends) + (0 if shared else len(self.text))


def _wake(waiters: list[asyncio.Future[None]] | None) -> None:
    if waiters:
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
        waiters.clear()


async def _wait_on(waiters: list[asyncio.Future[None]]) -> None:
    fut = asyncio.get_running_loop().create_future()
    waiters.append(fut)
    try:
        await fut
    finally:
        if not fut.done():
            fut.cancel()
            waiters.remove(fut)


@final
class Ticket:
    """A submitted request: its id, its status, its tokens as they come, and its result.

    Every accepted request ends in exactly one terminal status (completed, failed, timeout,
    cancelled). The work belongs to the pipeline, not to whoever waits: cancelling a task
    that awaits ``result()`` ends only that wait; ``cancel()`` ends the request.

    Example:
        >>> async def demo(handles: "PipelineHandles") -> None:  # doctest: +SKIP
        ...     ticket = await handles.submit(PromptRequest("u1", "Hi"))
        ...     async for token in ticket.tokens():
        ...         print(token, end="")
        ...     print(await ticket.result())
    """

    __slots__ = (
        "_done",
        "_done_waiters",
        "_error",
        "_on_done",
        "_result",
        "_status",
        "_task",
        "_token_waiters",
        "_tokens",
        "_unwound",
        "_watched",
        "cache_key",
        "context",
        "created_at",
        "deadline",
        "finished_at",
        "output",
        "priority",
        "prompt",
        "request",
    )

    def __init__(
        self,
        request: PromptRequest,
        priority: Priority,
        on_done: Callable[[Ticket], None] | None = None,
    ) -> None:
        self.request = request
        self.priority = priority
        self.context = ""
        self.prompt = ""
        self.output = ""
        self.cache_key: str | None = None
        self.created_at = time.time()
        self.deadline = math.inf  # the event loop's clock; set when the pipeline accepts it
        self.finished_at: float | None = None
        self._status = _PENDING
        self._done = False
        self._result: str | None = None
        self._error: BaseException | None = None
        self._tokens: list[str] | _TokenLog = []
        self._done_waiters: list[asyncio.Future[None]] | None = None
        self._token_waiters: list[asyncio.Future[None]] | None = None
        self._on_done = on_done
        self._watched = False
        self._unwound: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Ticket {self.request.request_id} {self._status.value}>"

    # -- what callers read -----------------------------------------------------------------

    @property
    def request_id(self) -> str:
        """The request's id (a uuid4 string unless the request named one)."""
        return self.request.request_id

    @property
    def status(self) -> RequestStatus:
        """pending (queued), processing (the worker is producing it), or a terminal status."""
        return self._status

    def done(self) -> bool:
        """Whether the request reached its terminal status."""
        return self._done

    @property
    def text(self) -> str | None:
        """The result text once completed, else ``None``."""
        return self._result

    @property
    def error(self) -> BaseException | None:
        """Why the request failed, timed out or was cancelled; ``None`` otherwise."""
        return self._error

    @property
    def token_count(self) -> int:
        """Tokens produced so far."""
        return len(self._tokens)

    async def wait(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait until the request finishes, at most ``timeout`` seconds.

        Returns:
            Whether it finished. Cancelling the waiting task ends only this wait.
        """
        if self._done:
            return True
        if self._done_waiters is None:
            self._done_waiters = []
        if timeout is None:
            await _wait_on(self._done_waiters)
            return True
        try:
            async with asyncio.timeout(timeout):
                await _wait_on(self._done_waiters)
        except TimeoutError:
            return self._done
        return True

    async def result(self) -> str:
        """Wait for the request and return its text.

        Raises:
            InferenceError: The worker failed (or another ``OrchestratorError`` that made
                the request fail, such as ``Overloaded`` or ``StageError``).
            RequestTimeout: The request's deadline passed.
            RequestCancelled: The request was cancelled.
        """
        if not self._done:
            if self._done_waiters is None:
                self._done_waiters = []
            await _wait_on(self._done_waiters)
        if self._status is _COMPLETED:
            return self._result  # type: ignore[return-value]
        raise self._error  # type: ignore[misc]

    async def tokens(self) -> AsyncIterator[str]:
        """Yield every token of the output from the first, as the worker produces them.

        Iteration may start at any time, even after the request finished. Tokens are the
        worker's raw output; ``result()`` is the text after post-processing.

        Raises:
            The request's error (as ``result()``) after the tokens it produced, if it did
            not complete.
        """
        self._watched = True
        i = 0
        while True:
            tokens = self._tokens
            while i < len(tokens):
                yield tokens[i]
                i += 1
            if self._done:
                if self._status is not _COMPLETED:
                    assert self._error is not None
                    raise self._error
                return
            if self._token_waiters is None:
                self._token_waiters = []
            await _wait_on(self._token_waiters)

    async def cancel(self) -> bool:
        """End the request as ``cancelled`` wherever it is, and wait for its worker call
        (if one was in flight) to unwind.

        Returns:
            ``True`` if this call cancelled it, ``False`` if it had already finished.
        """
        task = self._task
        unwound: asyncio.Future[None] | None = None
        if task is not None and task is not asyncio.current_task():
            unwound = self._unwound = asyncio.get_running_loop().create_future()
        if not self.cancel_nowait():
            return False
        if unwound is not None:
            await asyncio.wait({unwound}, timeout=_CANCEL_GRACE)
        return True

    def cancel_nowait(self) -> bool:
        """End the request as ``cancelled`` and cancel its worker call, without waiting.

        Returns:
            ``True`` if this call cancelled it, ``False`` if it had already finished.
        """
        return self.finish(
            _CANCELLED, error=RequestCancelled(f"request {self.request_id} was cancelled")
        )

    # -- what the pipeline calls -----------------------------------------------------------

    def push_token(self, token: str) -> None:
        """Append a produced token and wake ``tokens()`` iterators (ignored once finished)."""
        if self._done:
            return
        self._tokens.append(token)  # type: ignore[union-attr]  # a list until finished
        if self._token_waiters:
            _wake(self._token_waiters)

    def push_tokens(self, tokens: list[str]) -> None:
        """Append several tokens at once (ignored once finished)."""
        if self._done:
            return
        self._tokens.extend(tokens)  # type: ignore[union-attr]  # a list until finished
        if self._token_waiters:
            _wake(self._token_waiters)

    @property
    def retained_bytes(self) -> int:
        """About how much memory the finished record holds: its input, result, error and
        tokens (what retention's byte bound counts)."""
        tokens = self._tokens
        kept = (
            tokens.nbytes(self._result)
            if isinstance(tokens, _TokenLog)
            else (sum(map(len, tokens)) + 56 * len(tokens))
        )
        error = 0 if self._error is None else 256
        return len(self.request.input) + len(self._result or "") + kept + error + _RECORD_OVERHEAD

    def expire(self) -> None:
        """End the request as ``timeout`` (its deadline passed)."""
        self.finish(_TIMEOUT, error=RequestTimeout(f"request {self.request_id} timed out"))

    def finish(
        self,
        status: RequestStatus,
        *,
        result: str | None = None,
        error: BaseException | None = None,
    ) -> bool:
        """Move to a terminal status once; later calls are ignored.

        Cancelling or timing out also cancels the worker call in flight.

        Returns:
            Whether this call finished the request.
        """
        if self._done:
            return False
        self._done = True
        self._status = status
        self._result = result
        self._error = error
        self.finished_at = time.time()
        # What only the stages needed goes now: a finished record keeps its input, result
        # or error, and its tokens (compacted), for as long as it is retained.
        self.context = self.prompt = self.output = ""
        if len(self._tokens) > _COMPACT_AFTER:
            self._tokens = _TokenLog(self._tokens, result)  # type: ignore[arg-type]
        task = self._task
        # The task working for this ticket (its worker call, or an async hook) ends with
        # it; a call not started yet sees the ticket finished and never starts.
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        _wake(self._done_waiters)
        _wake(self._token_waiters)
        self._done_waiters = self._token_waiters = None  # no one waits on a finished ticket
        if self._on_done is not None:
            self._on_done(self)
        return True

    def release_task(self) -> None:
        """The task working for this ticket is done with it (a worker slot may go on
        serving others)."""
        self._task = None
        unwound = self._unwound
        if unwound is not None and not unwound.done():
            unwound.set_result(None)

    @property
    def watched(self) -> bool:
        """Whether someone iterates ``tokens()``: the pipeline then streams from the worker."""
        return self._watched

    def set_processing(self) -> None:
        """Mark the request as being produced by the worker."""
        if not self._done:
            self._status = _PROCESSING
