"""``RedisStore``: the request store and the token stream over Redis. Private.

- A record is a hash ``{prefix}req:{id}`` with a TTL: while in flight, its deadline plus
  the retention; once finished, the retention. ``FINISH`` ends it exactly once, in one
  script, even when a crashed worker's job is delivered again.
- Every finish is published on ``{prefix}events`` (``"<id> <status>"``). One subscriber
  task per process (``listen``) hears them: it refreshes the records this process follows,
  wakes whoever waits on them, and tells the finish listeners (a cancel reaches the call
  running here). A notification lost in an outage is made up for by a slow poll of the
  waiters (``fallback_poll``).
- A streamed request's tokens are a stream ``{prefix}tok:{id}`` (an entry per append, then
  an ``end`` entry), read with ``XREAD BLOCK`` from the first at any time; a request that
  did not stream keeps its tokens in its record, written by the finish.

Redis failures surface as ``BackendUnavailable`` (the server answers 503).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from typing import TYPE_CHECKING, Any, cast, final

import anyio

from orchestrator._waiters import Waiters
from orchestrator.distributed._records import RedisRecord, error_json, record_fields
from orchestrator.distributed._redis import backend_errors, command
from orchestrator.distributed._scripts import ADMIT, FINISH, START
from orchestrator.errors import BackendUnavailable, InvalidRequest, Overloaded
from orchestrator.types import RequestStatus

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

    from redis.asyncio import Redis

    from orchestrator._job import Job

__all__ = ["LEVELS", "RedisStore"]

logger = logging.getLogger("orchestrator.distributed")

LEVELS = ("critical", "high", "normal", "low")  # the queue's streams, served in this order
_LEVEL_OF = {name: i + 1 for i, name in enumerate(LEVELS)}


@final
class RedisStore:
    """The request store and token stream of every process on one Redis.

    Args:
        client: A ``redis.asyncio.Redis`` (``decode_responses=False``), borrowed.
        prefix: Prepended to every key and the events channel.
        retention_seconds, retention_max, retention_bytes: The finished records' bounds.
        fallback_poll: Seconds between the slow re-reads of a record someone waits on.
        block: Seconds one ``XREAD BLOCK`` of a token reader waits.
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = "orch:",
        retention_seconds: float = 300.0,
        retention_max: int = 10_000,
        retention_bytes: int = 128 * 1024 * 1024,
        fallback_poll: float = 1.0,
        block: float = 0.5,
    ) -> None:
        self._client = client
        self.prefix = prefix
        self.retention_seconds = retention_seconds
        self.retention_max = retention_max
        self.retention_bytes = retention_bytes
        self.fallback_poll = fallback_poll
        self._block_ms = max(1, round(block * 1000))
        self._admit = client.register_script(ADMIT)
        self._start = client.register_script(START)
        self._finish = client.register_script(FINISH)
        self.channel = f"{prefix}events"
        self._finished_key = f"{prefix}finished"
        self._sizes_key = f"{prefix}sizes"
        self._bytes_key = f"{prefix}bytes"
        self.streams = [f"{prefix}q:{level}" for level in LEVELS]
        self._followed: dict[str, RedisRecord] = {}  # records someone here reads or awaits
        self._working: dict[str, RedisRecord] = {}  # records of the jobs run here
        self._buffers: dict[str, list[str]] = {}  # tokens of requests run here, not streamed
        self._listeners: list[Callable[[str, RequestStatus], object]] = []
        self._errors = backend_errors()
        self._listen_errors: tuple[type[BaseException], ...] = (
            *self._errors,
            BackendUnavailable,
        )
        self.worker_id = ""

    # -- keys ------------------------------------------------------------------------------

    def record_key(self, request_id: str) -> str:
        return f"{self.prefix}req:{request_id}"

    def tokens_key(self, request_id: str) -> str:
        return f"{self.prefix}tok:{request_id}"

    # -- following -------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests this process admitted or runs that have not finished."""
        return len(self._followed.keys() | self._working.keys())

    def follow(self, record: RedisRecord) -> RedisRecord:
        """Keep ``record`` up to date from the notifications (the one already followed, if
        any, is returned instead)."""
        return self._followed.setdefault(record.id, record)

    def peek(self, request_id: str) -> RedisRecord | None:
        """A record this process follows, without a read (``None`` if it follows none)."""
        return self._followed.get(request_id)

    def followed(self) -> list[RedisRecord]:
        return list(self._followed.values())

    def work_on(self, record: RedisRecord) -> RedisRecord:
        """Run the job of ``record`` here: its own record object (a frontend in the same
        process keeps its own), ended when the request finishes, wherever."""
        self._working[record.id] = record
        return record

    def working(self) -> list[RedisRecord]:
        return list(self._working.values())

    def stop_working(self, request_id: str) -> None:
        """This process no longer runs the job (handed back): its stages skip it."""
        record = self._working.pop(request_id, None)
        if record is not None and record.finished_at is None:
            record.finished_at = time.time()  # here only: the record in Redis goes on
        self._buffers.pop(request_id, None)

    # -- the request store -----------------------------------------------------------------

    async def admit(
        self, job: Job, capacity: int, record_ttl: float, *, queue: bool = True
    ) -> RedisRecord:
        """Create ``job``'s record and queue it at its priority, in one script (without
        ``queue``, the record alone).

        Raises:
            InvalidRequest: Its id is in use.
            Overloaded: The queue holds ``capacity`` jobs (queued or in hand).
            BackendUnavailable: Redis did not answer.
        """
        record = job.record
        assert isinstance(record, RedisRecord)  # made for it by the admitting process
        args: list[str | int | float] = [
            capacity,
            _LEVEL_OF[str(job.priority)] if queue else 0,
            json.dumps(job.to_dict(time.monotonic()), ensure_ascii=False),
            max(1, math.ceil(record_ttl * 1000)),
            *record_fields(job, record.created_at),
        ]
        admitted = await command(
            self._admit(keys=[self.record_key(job.id), *self.streams], args=args)
        )
        if admitted == -1:
            raise InvalidRequest(f"request id {job.id!r} is already in use")
        if admitted == 0:
            raise Overloaded(
                f"the shared queue is at capacity ({capacity} requests)", stage="inference"
            )
        return self.follow(record)

    async def create(self, job: Job) -> RedisRecord:
        """``admit`` without a capacity: the record and the queued job."""
        return await self.admit(job, 2**62, job.deadline - time.monotonic())

    async def read(self, request_id: str) -> RedisRecord | None:
        fields = await command(
            cast("Awaitable[dict[bytes, bytes]]", self._client.hgetall(self.record_key(request_id)))
        )
        followed = self._followed.get(request_id)
        if followed is not None:
            followed.update(fields)
            return followed
        return RedisRecord.from_hash(request_id, fields) if fields else None

    async def start(self, request_id: str) -> bool:
        working = self._working.get(request_id)
        if working is not None and working.status is RequestStatus.PROCESSING:
            # Taken by this worker, and marked processing by the take: no round trip.
            return working.finished_at is None
        started = await command(
            self._start(keys=[self.record_key(request_id)], args=[self.worker_id])
        )
        if started:
            for record in (self._working.get(request_id), self._followed.get(request_id)):
                if record is not None:
                    record.status = RequestStatus.PROCESSING
        return bool(started)

    async def answered(self, job: Job, text: str) -> RedisRecord:
        """Record a request answered at admission (a cache hit): created and completed."""
        record = await self.admit(job, 0, job.deadline - time.monotonic(), queue=False)
        self._buffers[job.id] = [text]
        self._working[job.id] = record  # so the finish writes its one token
        await self.finish(job.id, RequestStatus.COMPLETED, result=text)
        return record

    async def finish(
        self,
        request_id: str,
        status: RequestStatus,
        *,
        result: str | None = None,
        error: BaseException | None = None,
    ) -> bool:
        buffered = self._buffers.pop(request_id, None)
        record = self._working.get(request_id) or self._followed.get(request_id)
        size = 512 + len(result or "")
        if record is not None:
            size += len(record.request.input)
        tokens = "" if buffered is None else json.dumps(buffered, ensure_ascii=False)
        size += len(tokens)
        finished: int = await command(
            self._finish(
                keys=[
                    self.record_key(request_id),
                    self.tokens_key(request_id),
                    self._finished_key,
                    self._sizes_key,
                    self._bytes_key,
                ],
                args=[
                    status.value,
                    result or "",
                    "0" if result is None else "1",
                    error_json(error),
                    tokens,
                    max(1, math.ceil(self.retention_seconds * 1000)),
                    self.retention_max,
                    self.retention_bytes,
                    request_id,
                    self.channel,
                    size,
                    self.prefix,
                ],
            )
        )
        if finished == 1:
            now = time.time()
            for done in (self._working.pop(request_id, None), self._followed.pop(request_id, None)):
                if done is None:
                    continue
                done.status, done.result, done.error, done.finished_at = status, result, error, now
                if buffered is not None:
                    done.tokens, done.token_count = buffered, len(buffered)
                if done.done_waiters is not None:
                    done.done_waiters.wake_all()
        return finished == 1

    async def wait(self, request_id: str, within: float | None) -> RedisRecord | None:
        record = self._followed.get(request_id)
        if record is None:
            record = await self.read(request_id)
            if record is None or record.finished_at is not None:
                return record
            record = self.follow(record)
        if record.finished_at is not None:
            return record
        if record.done_waiters is None:
            record.done_waiters = Waiters()
        deadline = math.inf if within is None else anyio.current_time() + within
        while record.finished_at is None:
            left = deadline - anyio.current_time()
            if left <= 0:
                break
            with anyio.move_on_after(min(left, self.fallback_poll)):
                await record.done_waiters.wait()
            if record.finished_at is None:  # the slow poll: a notification may be lost
                with contextlib.suppress(BackendUnavailable):
                    await self.read(request_id)
        return record

    def on_finish(self, listener: Callable[[str, RequestStatus], object]) -> None:
        self._listeners.append(listener)

    # -- the token stream ------------------------------------------------------------------

    async def append_tokens(self, request_id: str, tokens: Sequence[str]) -> None:
        record = self._working.get(request_id)
        if record is None or record.finished_at is not None:
            return
        if not record.stream:  # written with the record by the finish
            self._buffers.setdefault(request_id, []).extend(tokens)
            record.token_count += len(tokens)
            return
        key = self.tokens_key(request_id)
        ttl = max(1, math.ceil((self.retention_seconds + 3600) * 1000))
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"t": json.dumps(list(tokens), ensure_ascii=False)})
            pipe.pexpire(key, ttl)
            await command(pipe.execute())
        record.token_count += len(tokens)

    async def read_token_batches(self, request_id: str) -> AsyncIterator[Sequence[str]]:
        record = self._followed.get(request_id) or await self.read(request_id)
        if record is None:
            return
        if not record.stream:
            record = await self.wait(request_id, None)
            tokens = record.tokens if record is not None else None
            if tokens:
                yield list(tokens)
            return
        key, last = self.tokens_key(request_id), "0-0"
        finished = False  # seen finished: read what is left without blocking, then stop
        while True:
            block = None if finished else self._block_ms
            answer = await command(self._client.xread({key: last}, count=256, block=block))
            if not answer:  # nothing within the block: has it ended without an end entry?
                if finished:
                    return
                current = await self.read(request_id)
                finished = current is None or current.finished_at is not None
                continue
            batch: list[str] = []
            ended = False
            for entry_id, fields in answer[0][1]:
                last = entry_id
                if b"end" in fields:
                    ended = True
                    break
                batch += json.loads(fields[b"t"])
            if batch:
                yield batch
            if ended:
                return

    # -- notifications ---------------------------------------------------------------------

    async def listen(self, ready: Callable[[], object] | None = None) -> None:
        """Hear every finish until cancelled (a task the runtime owns); reconnects after
        an outage, and re-reads what it follows, since notifications may have been lost."""
        pause = 0.05
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                if ready is not None:
                    ready()
                    ready = None
                else:
                    await self._refresh([r.id for r in self.followed()])
                pause = 0.05
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    heard = [message]
                    while (more := await pubsub.get_message(timeout=0)) is not None:
                        heard.append(more)
                    await self._heard(heard)
            except self._listen_errors as exc:
                logger.warning("Redis notifications interrupted (%s); reconnecting", exc)
                await anyio.sleep(pause)
                pause = min(pause * 2, 2.0)
            finally:
                with anyio.CancelScope(shield=True), contextlib.suppress(*self._errors):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _heard(self, messages: list[dict[str, Any]]) -> None:
        ended: list[str] = []
        for message in messages:
            data = message.get("data")
            if not isinstance(data, bytes):
                continue
            try:
                note = json.loads(data)
                request_id = note["id"]
                status = RequestStatus(note["status"])
            except (ValueError, KeyError, TypeError):
                continue
            for listener in self._listeners:
                listener(request_id, status)
            working = self._working.pop(request_id, None)
            if working is not None and working.finished_at is None:
                working.status, working.finished_at = status, time.time()  # stages skip it
            followed = self._followed.get(request_id)
            if followed is None:
                continue
            if note.get("full"):  # the outcome came with the notification: no read
                followed.heard(note)
                self._followed.pop(request_id, None)
                if followed.done_waiters is not None:
                    followed.done_waiters.wake_all()
            else:
                ended.append(request_id)
        if ended:
            await self._refresh(ended)

    async def _refresh(self, request_ids: list[str]) -> None:
        """Re-read followed records; those finished are woken and no longer followed."""
        if not request_ids:
            return
        async with self._client.pipeline(transaction=False) as pipe:
            for request_id in request_ids:
                pipe.hgetall(self.record_key(request_id))
            answers = await command(pipe.execute())
        for request_id, fields in zip(request_ids, answers, strict=True):
            record = self._followed.get(request_id)
            if record is None:
                continue
            if fields:
                record.update(fields)
            elif record.finished_at is None:  # gone (retention): nothing more will come
                record.finished_at = time.time()
            if record.finished_at is not None:
                self._followed.pop(request_id, None)
                if record.done_waiters is not None:
                    record.done_waiters.wake_all()
