"""The three seams between the pipeline's stages and where a request's state lives.
Private; docs/architecture.md draws them.

In one process they are ``MemoryStore`` (the request store and the token stream, one
entry per request) and ``MemoryWorkQueue`` (the priority queue in front of Inference).
Across processes each gets a Redis implementation with the same semantics; the stages,
``Ticket`` and the server's routes use only what is here.

- **Request store**: a record per job, created once (a second create of an id is refused),
  read by id, moved to ``processing``, and *finished* with its terminal status and result
  or error atomically and exactly once (a second finish is a no-op that says so). Finishing
  also ends the request's token stream. Waiting for the finish is woken, never polled.
  Finished records are retained by age, count and bytes. Listeners hear of every finish
  (``on_finish``): that is how a cancel or a timeout reaches the call working on the job.
- **Work queue**: put a job at its priority (at capacity: displace a lower-priority job,
  wait for room, or refuse with ``Overloaded``, as the implementation can); take the next,
  CRITICAL before HIGH before NORMAL before LOW, FIFO within a level, as a lease;
  acknowledge a lease once the job's record is finished; release one unstarted (a peer
  takes it at once).
- **Token stream**: append a request's tokens as they come; read them from the first, at
  any time, live, until the record finishes, in batches: each batch is every token that
  had arrived and was not yet read when the reader looked (so a reader that falls behind
  catches up in one step, and a writer that relays them can send a batch in one write).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence

    from orchestrator._job import Job
    from orchestrator.types import PromptRequest, RequestStatus

__all__ = ["RequestRecord", "RequestStore", "TokenStream", "WorkQueue"]


class RequestRecord(Protocol):
    """What the store knows of a request. In process it is the live record; from a shared
    store, the state as of the read."""

    @property
    def id(self) -> str: ...

    @property
    def request(self) -> PromptRequest: ...

    @property
    def status(self) -> RequestStatus: ...

    @property
    def result(self) -> str | None: ...

    @property
    def error(self) -> BaseException | None: ...

    @property
    def created_at(self) -> float: ...

    @property
    def finished_at(self) -> float | None: ...

    @property
    def token_count(self) -> int: ...


class RequestStore(Protocol):
    """Request records: see the module docstring for the semantics."""

    async def create(self, job: Job) -> RequestRecord:
        """Record ``job`` as pending.

        Raises:
            InvalidRequest: Its id is in use.
        """
        ...

    async def read(self, request_id: str) -> RequestRecord | None:
        """The record, or ``None`` (unknown, or no longer retained)."""
        ...

    async def start(self, request_id: str) -> bool:
        """Mark it ``processing``; ``False`` if it has finished (then do not start it)."""
        ...

    async def finish(
        self,
        request_id: str,
        status: RequestStatus,
        *,
        result: str | None = None,
        error: BaseException | None = None,
    ) -> bool:
        """End it with a terminal ``status``, exactly once, and end its token stream.

        Returns:
            Whether this call finished it (``False``: it had finished already).
        """
        ...

    async def wait(self, request_id: str, within: float | None) -> RequestRecord | None:
        """Wait until it finishes, at most ``within`` seconds; the record as it then is
        (``None``: unknown). Cancelling the waiting task ends only the wait."""
        ...

    def on_finish(self, listener: Callable[[str, RequestStatus], object]) -> None:
        """Call ``listener(request_id, status)`` whenever a record finishes."""
        ...


class TokenStream(Protocol):
    """A request's tokens: see the module docstring for the semantics."""

    async def append_tokens(self, request_id: str, tokens: Sequence[str]) -> None:
        """Add tokens (ignored once the record has finished)."""
        ...

    def read_token_batches(self, request_id: str) -> AsyncIterator[Sequence[str]]:
        """Every token from the first, then the live ones, as batches of those waiting
        (never an empty batch); ends when the record finishes."""
        ...


class WorkQueue(Protocol):
    """The queue in front of Inference: see the module docstring for the semantics."""

    @property
    def acknowledges(self) -> bool:
        """Whether leases need ``ack`` (``False``: a queue of one process, where a job
        taken is simply in hand)."""
        ...

    async def put(self, job: Job) -> Job | None:
        """Queue ``job`` at its priority.

        Returns:
            A lower-priority job displaced to make room (the caller fails it), or ``None``.

        Raises:
            Overloaded: Full, and this queue refuses rather than waits.
            PipelineClosed: The queue is closed.
        """
        ...

    async def take(self) -> Job | None:
        """The next job, as a lease; ``None`` once the queue is closed and empty."""
        ...

    async def ack(self, job: Job) -> None:
        """The job's record is finished: its lease may go."""
        ...

    async def release(self, job: Job) -> None:
        """Give an unstarted job back, for the next taker."""
        ...

    def close(self) -> None:
        """Refuse new jobs; takers get what is left, then ``None``."""
        ...
