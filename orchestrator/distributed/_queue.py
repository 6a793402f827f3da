"""``RedisWorkQueue``: the work queue every worker process shares, on Redis Streams. Private.

A stream per priority level (``{prefix}q:critical`` ... ``{prefix}q:low``) and one
consumer group (``workers``); each worker process is a consumer.

- **put** (``RedisStore.admit``): the record and the entry in one script, refused at
  capacity: the entries in the streams are the jobs queued or in a worker's hands, since
  an entry is deleted when its lease is acknowledged. So nothing ever needs trimming, and
  no entry still pending is ever deleted (on Redis 7.0 ``XTRIM MAXLEN`` would).
- **take**: ``XREADGROUP`` over the four streams, at most ``free`` entries, the highest
  level first; each delivery is counted in the record (``attempt``).
- **ack**: ``XACK`` and ``XDEL``, once the job's record is finished (a finish listener).
- **release**: a job read but not started goes back at once: one script acknowledges and
  deletes its entry and adds a copy at the end of its level, which the next
  ``XREADGROUP`` of any worker takes.
- **renew**: a long call's lease is kept by resetting its idle time (``XCLAIM JUSTID``).
- **reclaim**: a dead worker's entries, idle past ``reclaim_after``, are claimed
  (``XAUTOCLAIM``) and run again here: at-least-once delivery.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any, final

from orchestrator._job import Job
from orchestrator.distributed._records import RedisRecord
from orchestrator.distributed._redis import command
from orchestrator.distributed._scripts import MARK, RELEASE, TAKE
from orchestrator.types import RequestStatus

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from orchestrator.distributed._store import RedisStore

__all__ = ["GROUP", "Delivery", "RedisWorkQueue"]

logger = logging.getLogger("orchestrator.distributed")

GROUP = "workers"


@final
class Delivery:
    """A job as a worker got it: the lease (stream and entry id) and what the record
    said at delivery (its attempt count, whether it had finished, tokens streamed)."""

    __slots__ = ("attempt", "entry", "finished", "job", "stream", "streamed")

    def __init__(
        self, job: Job, stream: str, entry: str, attempt: int, finished: bool, streamed: int
    ) -> None:
        self.job = job
        self.stream = stream
        self.entry = entry
        self.attempt = attempt
        self.finished = finished
        self.streamed = streamed


@final
class RedisWorkQueue:
    """The shared work queue, seen from one worker process (the consumer ``consumer``)."""

    acknowledges = True

    def __init__(
        self,
        client: Redis,
        store: RedisStore,
        *,
        consumer: str,
        reclaim_after: float = 15.0,
        block: float = 0.5,
    ) -> None:
        self._client = client
        self._store = store
        self.consumer = consumer
        self.reclaim_after = reclaim_after
        self._block_ms = max(1, round(block * 1000))
        self._streams = store.streams
        # request id -> (stream, entry id, the job's JSON as queued)
        self._leases: dict[str, tuple[str, str, bytes]] = {}
        self._release = client.register_script(RELEASE)
        self._take = client.register_script(TAKE)
        self._mark_script = client.register_script(MARK)
        self._ready = False

    @property
    def leases(self) -> int:
        """Entries this process holds."""
        return len(self._leases)

    def holds(self, request_id: str) -> bool:
        return request_id in self._leases

    async def ensure_group(self) -> None:
        """Create the consumer group on every stream (idempotent)."""
        from redis.exceptions import ResponseError

        for stream in self._streams:
            try:
                await command(self._client.xgroup_create(stream, GROUP, id="0", mkstream=True))
            except Exception as exc:
                cause = exc.__cause__
                if not (isinstance(cause, ResponseError) and "BUSYGROUP" in str(cause)):
                    raise
        self._ready = True

    async def take(self, free: int) -> list[Delivery]:
        """Up to ``free`` jobs, highest level first; waits (one ``block`` at most) for one
        when the queue is empty."""
        if not self._ready:
            await self.ensure_group()
        flat = await command(
            self._take(keys=self._streams, args=[GROUP, self.consumer, free, self._store.prefix])
        )
        if flat:
            return self._deliveries(
                [
                    (self._streams[int(flat[i]) - 1], _text(flat[i + 1]), flat[i + 2])
                    for i in range(0, len(flat), 6)
                ],
                [tuple(flat[i + 3 : i + 6]) for i in range(0, len(flat), 6)],
            )
        # Nothing queued: wait for the first entry of any level (a scripted read cannot
        # block), then count it as TAKE would.
        answer = await command(
            self._client.xreadgroup(
                GROUP,
                self.consumer,
                dict.fromkeys(self._streams, ">"),
                count=1,
                block=self._block_ms,
            )
        )
        entries: list[tuple[str, str, bytes]] = []
        for stream, items in answer or ():
            name = stream.decode() if isinstance(stream, bytes) else stream
            entries.extend((name, _text(entry_id), fields[b"job"]) for entry_id, fields in items)
        return await self._mark(entries)

    async def reclaim(self, free: int) -> list[Delivery]:
        """Claim up to ``free`` entries idle past ``reclaim_after`` (a dead worker's)."""
        if not self._ready:
            await self.ensure_group()
        idle_ms = max(1, round(self.reclaim_after * 1000))
        entries: list[tuple[str, str, bytes]] = []
        for stream in self._streams:
            if len(entries) >= free:
                break
            answer = await command(
                self._client.xautoclaim(
                    stream, GROUP, self.consumer, idle_ms, "0-0", count=free - len(entries)
                )
            )
            for entry_id, fields in answer[1]:
                if fields:  # an entry deleted meanwhile comes back empty
                    entries.append((stream, _text(entry_id), fields[b"job"]))
        return await self._mark(entries)

    async def _mark(self, entries: list[tuple[str, str, bytes]]) -> list[Delivery]:
        if not entries:
            return []
        store = self._store
        keys: list[str] = []
        for _, _, raw in entries:
            request_id = json.loads(raw)["id"]
            keys += (store.record_key(request_id), store.tokens_key(request_id))
        flat = await command(self._mark_script(keys=keys, args=[self.consumer]))
        return self._deliveries(entries, [tuple(flat[i : i + 3]) for i in range(0, len(flat), 3)])

    def _deliveries(
        self, entries: list[tuple[str, str, bytes]], marks: list[tuple[Any, ...]]
    ) -> list[Delivery]:
        now = time.monotonic()
        deliveries = []
        for (stream, entry_id, raw), (attempt, finished, streamed) in zip(
            entries, marks, strict=True
        ):
            data = json.loads(raw)
            record = _work_record(data)
            job = Job.from_dict(data, now, record)
            job.attempt = int(attempt)
            if not finished:
                record.status = RequestStatus.PROCESSING  # marked so by the script
            self._leases[job.id] = (stream, entry_id, raw)
            deliveries.append(
                Delivery(job, stream, entry_id, int(attempt), bool(finished), int(streamed))
            )
        return deliveries

    async def ack(self, request_id: str) -> None:
        """The record is finished: drop the entry (``XACK`` and ``XDEL``)."""
        await self.ack_many([request_id])

    async def ack_many(self, request_ids: list[str]) -> None:
        """``ack`` for several, in one round trip."""
        by_stream: dict[str, list[str]] = {}
        for request_id in request_ids:
            lease = self._leases.pop(request_id, None)
            if lease is not None:
                by_stream.setdefault(lease[0], []).append(lease[1])
        if not by_stream:
            return
        async with self._client.pipeline(transaction=False) as pipe:
            for stream, entry_ids in by_stream.items():
                pipe.xack(stream, GROUP, *entry_ids)
                pipe.xdel(stream, *entry_ids)
            await command(pipe.execute())

    async def release(self, request_ids: list[str]) -> None:
        """Hand jobs not started back to the peers, at once."""
        for request_id in request_ids:
            lease = self._leases.pop(request_id, None)
            if lease is not None:
                stream, entry_id, job = lease
                await command(self._release(keys=[stream], args=[GROUP, entry_id, job]))

    async def dead_letter(self, request_id: str, reason: str) -> None:
        """Set a job aside for good (its record is failed by the caller)."""
        lease = self._leases.get(request_id)
        if lease is None:
            return
        await command(
            self._client.xadd(
                f"{self._store.prefix}dead",
                {"job": lease[2], "reason": reason},
                maxlen=10_000,
                approximate=True,
            )
        )

    async def renew(self) -> None:
        """Reset the idle time of every entry held, so no peer reclaims a live call."""
        by_stream: dict[str, list[int | bytes | str | memoryview[int]]] = {}
        for stream, entry_id, _ in list(self._leases.values()):
            by_stream.setdefault(stream, []).append(entry_id)
        for stream, entry_ids in by_stream.items():
            await command(
                self._client.xclaim(stream, GROUP, self.consumer, 0, entry_ids, justid=True)
            )

    def forget(self, request_id: str) -> None:
        """Drop a lease without acknowledging it: no longer renewed, it is reclaimed."""
        self._leases.pop(request_id, None)

    def held(self) -> list[str]:
        """The request ids whose entries this process holds."""
        return list(self._leases)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _work_record(data: dict[str, Any]) -> RedisRecord:
    """The record a worker keeps of a job it took (its state until it is read)."""
    from orchestrator.types import PromptRequest

    request = PromptRequest(
        data["session"], data["input"], data["meta"], data["id"], timeout=data["timeout"]
    )
    return RedisRecord(request, stream=bool(data["stream"]), created_at=time.time())
