"""``MemoryStore``: the request store and the token stream of one process. Private.

One entry per request holds its record and its tokens, so a finish ends both at once. A
finished entry keeps only what status, result and ``tokens()`` need: its request, its
result or error, and its tokens, stored as one string with where each ends once there are
many. Finished entries are retained by age, count and bytes, the oldest leaving first.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import time
from typing import TYPE_CHECKING, final, overload

from orchestrator._waiters import Waiters
from orchestrator.errors import InvalidRequest
from orchestrator.types import RequestStatus

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator, Sequence

    from orchestrator._job import Job
    from orchestrator.types import PromptRequest

__all__ = ["MemoryStore", "Record"]

_PENDING = RequestStatus.PENDING
_PROCESSING = RequestStatus.PROCESSING

_COMPACT_AFTER = 64  # tokens: a finished entry with more keeps them as one string
_RECORD_OVERHEAD = 512  # bytes an entry costs beyond its text (estimated)


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

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):  # a list, as the list it replaces would give
            return [self[i] for i in range(*index.indices(len(self._ends)))]
        start = self._ends[index - 1] if index else 0
        return self.text[start : self._ends[index]]

    def nbytes(self, result: str | None) -> int:
        shared = self.text is result
        return self._ends.itemsize * len(self._ends) + (0 if shared else len(self.text))


@final
class Record:
    """One request's record in this process (it satisfies ``RequestRecord``): live, so a
    ``Ticket`` holding it always reads the current state."""

    __slots__ = (
        "created_at",
        "done_waiters",
        "error",
        "finished_at",
        "id",
        "request",
        "result",
        "status",
        "token_waiters",
        "tokens",
    )

    def __init__(self, request: PromptRequest) -> None:
        self.id = request.request_id
        self.request = request
        self.status = _PENDING
        self.result: str | None = None
        self.error: BaseException | None = None
        self.created_at = time.time()
        self.finished_at: float | None = None
        # A list while it grows; finished, a tuple (of str only, so the cyclic GC stops
        # tracking it) or, past _COMPACT_AFTER tokens, one string.
        self.tokens: list[str] | tuple[str, ...] | _TokenLog = []
        self.done_waiters: Waiters | None = None
        self.token_waiters: Waiters | None = None

    def __repr__(self) -> str:
        return f"<Record {self.id} {self.status.value}>"

    @property
    def token_count(self) -> int:
        return len(self.tokens)

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    def retained_bytes(self) -> int:
        """About how much memory the finished record holds (what retention counts)."""
        tokens, result = self.tokens, self.result
        if isinstance(tokens, _TokenLog):
            kept = tokens.nbytes(result)
        else:  # a few short tokens: about the result's text again, plus each str's header
            kept = (len(result) if result else 0) + 56 * len(tokens)
        error = 0 if self.error is None else 256
        return len(self.request.input) + len(result or "") + kept + error + _RECORD_OVERHEAD


@final
class MemoryStore:
    """The request store and token stream of one process (``RequestStore`` and
    ``TokenStream``).

    Args:
        retention_seconds: How long a finished record stays readable.
        retention_max: How many finished records at most.
        retention_bytes: How many bytes of finished records at most (about).
        clock: Monotonic seconds, for retention's ages.
    """

    __slots__ = (
        "_bytes",
        "_clock",
        "_finished",
        "_listeners",
        "_records",
        "in_flight",
        "retention_bytes",
        "retention_max",
        "retention_seconds",
    )

    def __init__(
        self,
        *,
        retention_seconds: float,
        retention_max: int,
        retention_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.retention_seconds = retention_seconds
        self.retention_max = retention_max
        self.retention_bytes = retention_bytes
        self._clock = clock
        self._records: dict[str, Record] = {}
        self._finished: collections.deque[tuple[float, str, int]] = collections.deque()
        self._bytes = 0
        self._listeners: list[Callable[[str, RequestStatus], object]] = []
        self.in_flight = 0

    # -- the request store -----------------------------------------------------------------

    async def create(self, job: Job) -> Record:
        return self.create_nowait(job.request)

    def create_nowait(self, request: PromptRequest) -> Record:
        """``create`` without awaiting.

        Raises:
            InvalidRequest: The id is in use.
        """
        request_id = request.request_id
        if request_id in self._records:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        record = self._records[request_id] = Record(request)
        self.in_flight += 1
        return record

    def in_use(self, request_id: str) -> bool:
        """Whether ``create`` would refuse ``request_id``."""
        return request_id in self._records

    async def read(self, request_id: str) -> Record | None:
        return self.peek(request_id)

    def peek(self, request_id: str) -> Record | None:
        """``read`` without awaiting."""
        record = self._records.get(request_id)
        if record is not None and record.finished_at is not None:
            self._expire(self._clock())  # retention by age, even when traffic has stopped
            return self._records.get(request_id)
        return record

    async def start(self, request_id: str) -> bool:
        record = self._records.get(request_id)
        if record is None or record.finished_at is not None:
            return False
        record.status = _PROCESSING
        return True

    async def finish(
        self,
        request_id: str,
        status: RequestStatus,
        *,
        result: str | None = None,
        error: BaseException | None = None,
    ) -> bool:
        return self.finish_nowait(request_id, status, result=result, error=error)

    def finish_nowait(
        self,
        request_id: str,
        status: RequestStatus,
        *,
        result: str | None = None,
        error: BaseException | None = None,
    ) -> bool:
        """``finish`` without awaiting."""
        record = self._records.get(request_id)
        if record is None or record.finished_at is not None:
            return False
        record.status = status
        record.result = result
        record.error = error
        record.finished_at = time.time()
        tokens = record.tokens
        if len(tokens) > _COMPACT_AFTER:
            record.tokens = _TokenLog(tokens, result)  # type: ignore[arg-type]
        else:
            record.tokens = tuple(tokens)
        waiters = record.done_waiters
        if waiters is not None:
            waiters.wake_all()
            record.done_waiters = None
        waiters = record.token_waiters
        if waiters is not None:
            waiters.wake_all()
            record.token_waiters = None
        self.in_flight -= 1
        for listener in self._listeners:
            listener(request_id, status)
        # Retention: the oldest finished records leave past the age, count or byte bound.
        now = self._clock()
        finished = self._finished
        size = record.retained_bytes()
        finished.append((now, request_id, size))
        self._bytes += size
        if (
            len(finished) > self.retention_max
            or finished[0][0] < now - self.retention_seconds
            or self._bytes > self.retention_bytes
        ):
            self._expire(now)
        return True

    async def wait(self, request_id: str, within: float | None) -> Record | None:
        record = self._records.get(request_id)
        if record is None or record.finished_at is not None:
            return record
        if record.done_waiters is None:
            record.done_waiters = Waiters()
        if within is None:
            await record.done_waiters.wait()
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await record.done_waiters.wait()
        return record

    def on_finish(self, listener: Callable[[str, RequestStatus], object]) -> None:
        self._listeners.append(listener)

    def unfinished(self) -> list[str]:
        """The ids of the records not finished yet."""
        return [r.id for r in self._records.values() if r.finished_at is None]

    # -- the token stream ------------------------------------------------------------------

    async def append_tokens(self, request_id: str, tokens: Sequence[str]) -> None:
        record = self._records.get(request_id)
        if record is not None and record.finished_at is None:
            record.tokens.extend(tokens)  # type: ignore[union-attr]  # a list until finished
            if record.token_waiters is not None:
                record.token_waiters.wake_all()

    async def read_token_batches(self, request_id: str) -> AsyncIterator[Sequence[str]]:
        record = self._records.get(request_id)
        if record is None:
            return
        i = 0
        while True:
            tokens = record.tokens
            n = len(tokens)
            if i < n:
                batch = tokens[i:]  # a copy: the list grows
                i = n
                yield batch
                continue  # more may have come, or the record finished, meanwhile
            if record.finished_at is not None:
                return
            if record.token_waiters is None:
                record.token_waiters = Waiters()
            await record.token_waiters.wait()

    # -- retention -------------------------------------------------------------------------

    def _expire(self, now: float) -> None:
        finished, records = self._finished, self._records
        horizon = now - self.retention_seconds
        max_count, max_bytes = self.retention_max, self.retention_bytes
        while finished and (
            len(finished) > max_count or finished[0][0] < horizon or self._bytes > max_bytes
        ):
            _, request_id, size = finished.popleft()
            self._bytes -= size
            records.pop(request_id, None)
