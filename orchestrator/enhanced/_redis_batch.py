"""The Redis commands of concurrent callers, sent together: one pipeline per batch.

Group commit, with no task of its own: the first caller to find no batch in flight leads.
It lets the event-loop turn finish (the other callers of that turn queue their commands
behind it), sends every queued command in one non-transactional pipeline, hands each
caller its reply, then hands the lead to the first caller that queued meanwhile. So there
is at most one batch in flight per client, and a busy server sends everything that queued
during one round trip in the next: the round trips per request fall as the load rises,
while a lone caller waits one loop turn more than a command of its own would.

Replies are per command: a command that fails (``NOSCRIPT``, a wrong type) fails only its
caller; a connection that fails (refused, timed out) fails every caller of the batch, each
of which counts it in its own ``Outage``. A follower cancelled while it waits may still
have its command run, unread. A leader cancelled while its batch is in flight (a released call
of an outage, a caller going away) gives the batch's other commands back to the queue for
the next leader, which sends them again: a command may then run twice, so only commands
that may (a read, a ``SET``, a rate-limit take: at worst one token more) go through here.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from typing import TYPE_CHECKING, Any, Final, final

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["CommandBatcher", "Queued", "batcher_for"]

_LEAD: Final = object()  # a follower's reply that makes it the next leader
_MISSING: Final = object()


@final
class _Entry:
    __slots__ = ("command", "detached", "future")

    def __init__(
        self, command: tuple[Any, ...], future: asyncio.Future[Any], *, detached: bool = False
    ) -> None:
        self.command = command
        self.future = future
        self.detached = detached  # nobody awaits it: never handed the lead


@final
class CommandBatcher:
    """Batches the commands sent to one client (see the module docstring).

    ``round_trips`` counts the pipelines sent, ``commands`` the commands in them.
    """

    __slots__ = ("__weakref__", "_busy", "_client", "_queue", "commands", "round_trips")

    def __init__(self, client: Redis) -> None:
        self._client = client
        self._queue: list[_Entry] = []
        self._busy = False  # a leader holds the lead (sending, or about to)
        self.round_trips = 0
        self.commands = 0

    async def execute(self, *command: Any) -> Any:
        """Send ``command`` (``"GET", key``) with the others of its batch; its reply.

        Raises:
            The command's own error, or the connection's (each as redis-py raises it).
        """
        return await self._reply(self._append(command, detached=False))

    def enqueue(self, *command: Any) -> Queued:
        """Queue ``command`` now, to await its reply later (``await queued.reply()``):
        a call that will send a command of its own next (a rate-limit check) takes this one
        in its batch. One nobody will await is ``discard()``-ed (else it is still sent, with
        some later batch).
        """
        entry = self._append(command, detached=True)
        entry.future.add_done_callback(_retrieve)  # a reply nobody reads must not warn
        return Queued(self, entry)

    def send_detached(self, *command: Any) -> asyncio.Future[Any] | None:
        """Queue ``command`` behind the batch in flight without waiting for its reply: the
        leader sends it (in order: a command queued later from this process runs after
        it), in its next batch or, with nobody else waiting, one more of its own (once:
        after that the lead lapses, and what is left goes with the next caller's batch).

        Returns:
            The reply's future (the caller reads its error, if any), or ``None``, nothing
            queued, when no batch is in flight: then ``await execute(...)``.
        """
        if not self._busy:
            return None
        return self._append(command, detached=True).future

    def _append(self, command: tuple[Any, ...], *, detached: bool) -> _Entry:
        entry = _Entry(command, asyncio.get_running_loop().create_future(), detached=detached)
        self._queue.append(entry)
        return entry

    async def _reply(self, entry: _Entry) -> Any:
        """Wait for a queued entry's reply, leading its batch if nobody leads."""
        future = entry.future
        if future.done():
            return future.result()
        entry.detached = False  # awaited from here: it may be handed the lead
        if not self._busy:
            self._busy = True
            await self._lead(entry, fresh=True)
            return entry.future.result()
        try:
            reply = await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.result() is _LEAD:
                self._queue.remove(entry)  # made leader, then cancelled before it could lead
                self._hand_off()
            raise
        if reply is _LEAD:
            await self._lead(entry, fresh=False)
            return entry.future.result()
        return reply

    async def _lead(self, own: _Entry, *, fresh: bool) -> None:
        """Send the queued commands (``own``'s among them), then pass the lead on."""
        queue = self._queue
        try:
            if fresh:
                try:
                    await asyncio.sleep(0)  # the rest of this loop turn joins the batch
                except asyncio.CancelledError:
                    queue.remove(own)  # not sent: nobody waits for it
                    raise
            else:  # the lead came on this entry's future (it kept its place in the queue)
                own.future = asyncio.get_running_loop().create_future()
            await self._send_queued(own)
            if self._queue and not self._awaited():
                # Only detached commands queued meanwhile: one batch more for them, then
                # the lead lapses (a stream of stores must not hold this caller).
                await self._send_queued(None)
        finally:
            self._hand_off()

    async def _send_queued(self, own: _Entry | None) -> None:
        batch, self._queue = self._queue, []
        try:
            replies = await self._send(batch)
        except asyncio.CancelledError:
            self._queue[:0] = [e for e in batch if e is not own and not e.future.done()]
            raise
        except BaseException as exc:
            failure = exc if isinstance(exc, Exception) else RuntimeError("the batch was stopped")
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(failure)
            if failure is exc:
                return
            raise
        for i, entry in enumerate(batch):
            future = entry.future
            if future.done():
                continue  # its caller was cancelled: nobody reads it
            reply = replies[i] if i < len(replies) else _MISSING
            if reply is _MISSING:
                future.set_exception(RuntimeError("Redis sent no reply to this command"))
            elif isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def _discard(self, entry: _Entry) -> None:
        """Take an unsent entry out of the queue (one being sent goes on, unread)."""
        with contextlib.suppress(ValueError):
            self._queue.remove(entry)

    def _awaited(self) -> bool:
        return any(not e.detached and not e.future.done() for e in self._queue)

    def _hand_off(self) -> None:
        """The lead goes to the first caller still waiting, or lapses (detached commands
        left by a cancelled leader go with the next batch)."""
        queue = self._queue
        for entry in queue:
            if not entry.detached and not entry.future.done():
                entry.future.set_result(_LEAD)  # it keeps its place: the order holds
                return
        queue[:] = [e for e in queue if e.detached]  # callers cancelled before their batch
        self._busy = False

    async def _send(self, batch: list[_Entry]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for entry in batch:
            pipe.execute_command(*entry.command)
        self.round_trips += 1
        self.commands += len(batch)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies


@final
class Queued:
    """A command queued by ``CommandBatcher.enqueue``; ``await reply()`` for its reply."""

    __slots__ = ("_batcher", "_entry")

    def __init__(self, batcher: CommandBatcher, entry: _Entry) -> None:
        self._batcher = batcher
        self._entry = entry

    async def reply(self) -> Any:
        """The command's reply (sending its batch now if no call leads one).

        Raises:
            The command's own error, or the connection's.
        """
        return await self._batcher._reply(self._entry)  # noqa: SLF001  # one module's

    def discard(self) -> None:
        """Nobody will read the reply: if the command is not sent yet, it never is."""
        self._batcher._discard(self._entry)  # noqa: SLF001  # one module's


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


_BATCHERS: Final[weakref.WeakKeyDictionary[Redis, CommandBatcher]] = weakref.WeakKeyDictionary()


def batcher_for(client: Redis) -> CommandBatcher:
    """The one batcher of ``client``: the cache and the rate limiter borrowing one client
    send their commands in the same pipelines."""
    batcher = _BATCHERS.get(client)
    if batcher is None:
        batcher = _BATCHERS[client] = CommandBatcher(client)
    return batcher
