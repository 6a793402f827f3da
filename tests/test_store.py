"""MemoryStore: the request store and the token stream of one process. Records are created
once, finished exactly once, waited on without polling, and retained by count, bytes and
age (on a fake clock); tokens replay from the first, compacted or not."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import anyio
import pytest

from orchestrator._job import Job
from orchestrator._store import MemoryStore, Record
from orchestrator.enhanced.priority import Priority
from orchestrator.errors import InferenceError, InvalidRequest
from orchestrator.types import PromptRequest, RequestStatus

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

pytestmark = pytest.mark.anyio

COMPLETED = RequestStatus.COMPLETED


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _store(
    *,
    retention_seconds: float = 3600,
    retention_max: int = 1000,
    retention_bytes: int = 10**9,
    clock: Clock | None = None,
) -> MemoryStore:
    return MemoryStore(
        retention_seconds=retention_seconds,
        retention_max=retention_max,
        retention_bytes=retention_bytes,
        clock=clock or Clock(),
    )


def _create(store: MemoryStore, request_id: str, text: str = "hi") -> Record:
    return store.create_nowait(PromptRequest("s", text, request_id=request_id))


# -- records -------------------------------------------------------------------------------


async def test_create_refuses_an_id_in_use() -> None:
    store = _store()
    first = _create(store, "a")
    with pytest.raises(InvalidRequest, match="already in use") as info:
        _create(store, "a")
    assert isinstance(info.value, ValueError)
    assert store.peek("a") is first
    assert store.in_use("a")
    assert not store.in_use("b")


async def test_create_records_a_job_as_pending() -> None:
    store = _store()
    request = PromptRequest("s", "hi", request_id="a")
    record = await store.create(Job(_placeholder(), request, Priority.NORMAL, 0.0))
    assert await store.read("a") is record
    assert (record.status, record.request, record.finished) == (
        RequestStatus.PENDING,
        request,
        False,
    )
    assert repr(record) == "<Record a pending>"
    with pytest.raises(InvalidRequest):
        await store.create(Job(record, request, Priority.NORMAL, 0.0))


def _placeholder() -> Record:
    """A record of another store, for a job the store under test is to record."""
    return _create(_store(), "elsewhere")


async def test_a_finished_record_still_holds_its_id() -> None:
    store = _store()
    _create(store, "a")
    await store.finish("a", COMPLETED, result="x")
    with pytest.raises(InvalidRequest):
        _create(store, "a")


async def test_read_finds_a_record_and_none_for_an_unknown_id() -> None:
    store = _store()
    record = _create(store, "a")
    assert await store.read("a") is record
    assert await store.read("nope") is None
    assert record.status is RequestStatus.PENDING
    assert record.finished_at is None


async def test_finish_happens_exactly_once_and_keeps_the_first_outcome() -> None:
    store = _store()
    record = _create(store, "a")
    assert await store.finish("a", COMPLETED, result="first") is True
    error = InferenceError("late")
    assert await store.finish("a", RequestStatus.FAILED, error=error) is False
    assert record.status is COMPLETED
    assert record.result == "first"
    assert record.error is None
    assert await store.finish("unknown", COMPLETED) is False


async def test_start_marks_processing_unless_finished() -> None:
    store = _store()
    record = _create(store, "a")
    assert await store.start("a") is True
    assert record.status is RequestStatus.PROCESSING
    await store.finish("a", RequestStatus.CANCELLED)
    assert await store.start("a") is False
    assert store.peek("a") is record
    assert str(record.status) == "cancelled"  # (str: mypy narrowed it to PROCESSING)
    assert await store.start("unknown") is False


async def test_in_flight_counts_unfinished_records() -> None:
    store = _store()
    for request_id in "abc":
        _create(store, request_id)
    assert store.in_flight == 3
    await store.finish("a", COMPLETED)
    await store.finish("a", COMPLETED)  # a second finish changes nothing
    assert store.in_flight == 2
    assert sorted(store.unfinished()) == ["b", "c"]


async def test_on_finish_listeners_hear_each_finish_once() -> None:
    store = _store()
    heard: list[tuple[str, RequestStatus]] = []
    also: list[str] = []
    store.on_finish(lambda request_id, status: heard.append((request_id, status)))
    store.on_finish(lambda request_id, status: also.append(request_id))
    _create(store, "a")
    _create(store, "b")
    await store.finish("a", RequestStatus.TIMEOUT)
    await store.finish("a", COMPLETED)
    await store.finish("b", COMPLETED)
    assert heard == [("a", RequestStatus.TIMEOUT), ("b", COMPLETED)]
    assert also == ["a", "b"]


# -- waiting -------------------------------------------------------------------------------


async def test_wait_with_a_timeout_returns_the_unfinished_record() -> None:
    store = _store()
    record = _create(store, "a")
    with anyio.fail_after(5):
        assert await store.wait("a", 0.01) is record
    assert record.finished_at is None


async def test_wait_wakes_every_waiter_on_finish() -> None:
    store = _store()
    record = _create(store, "a")
    waits = [asyncio.create_task(store.wait("a", None)) for _ in range(2)]
    timed = asyncio.create_task(store.wait("a", 30))
    await anyio.wait_all_tasks_blocked()
    assert not any(w.done() for w in [*waits, timed])
    await store.finish("a", COMPLETED, result="x")
    with anyio.fail_after(5):
        assert await asyncio.gather(*waits, timed) == [record] * 3
    assert record.status is COMPLETED


async def test_wait_returns_at_once_when_finished_or_unknown() -> None:
    store = _store()
    record = _create(store, "a")
    await store.finish("a", COMPLETED)
    with anyio.fail_after(5):
        assert await store.wait("a", None) is record
        assert await store.wait("unknown", None) is None


async def test_cancelling_a_wait_ends_only_that_wait() -> None:
    store = _store()
    _create(store, "a")
    cancelled = asyncio.create_task(store.wait("a", None))
    kept = asyncio.create_task(store.wait("a", None))
    await anyio.wait_all_tasks_blocked()
    cancelled.cancel()
    await anyio.wait_all_tasks_blocked()
    assert store.peek("a").finished_at is None  # type: ignore[union-attr]
    await store.finish("a", COMPLETED)
    with anyio.fail_after(5):
        assert (await kept).status is COMPLETED  # type: ignore[union-attr]
    assert cancelled.cancelled()


# -- tokens --------------------------------------------------------------------------------


async def test_read_token_batches_from_the_first_then_live_until_finish() -> None:
    store = _store()
    _create(store, "a")
    await store.append_tokens("a", ["one", " two"])
    await store.append_tokens("a", [" three"])
    reader = store.read_token_batches("a")
    with anyio.fail_after(5):
        assert await anext(reader) == ["one", " two", " three"]  # all that waited, at once
        nxt = asyncio.create_task(_next(reader))
        await anyio.wait_all_tasks_blocked()
        assert not nxt.done()
        await store.append_tokens("a", [" four"])
        assert await nxt == [" four"]  # a lone token alone
        rest = asyncio.create_task(_drain(reader))
        await anyio.wait_all_tasks_blocked()
        assert not rest.done()
        await store.finish("a", COMPLETED, result="one two three four")
        assert await rest == []


async def _next(reader: AsyncIterator[Sequence[str]]) -> Sequence[str]:
    return await anext(reader)


async def _drain(reader: AsyncIterator[Sequence[str]]) -> list[Sequence[str]]:
    return [batch async for batch in reader]


async def _tokens(store: MemoryStore, request_id: str) -> list[str]:
    return [token async for batch in store.read_token_batches(request_id) for token in batch]


async def test_read_tokens_however_late_and_none_after_finish() -> None:
    store = _store()
    record = _create(store, "a")
    await store.append_tokens("a", ["x", "y"])
    await store.finish("a", COMPLETED, result="xy")
    await store.append_tokens("a", ["late"])  # ignored: the stream ended with the record
    with anyio.fail_after(5):
        assert await _tokens(store, "a") == ["x", "y"]
        assert await _tokens(store, "unknown") == []
    assert record.token_count == 2


async def test_many_finished_tokens_replay_exactly_and_share_the_result() -> None:
    tokens = [f" w{i}" for i in range(200)]
    tokens[5] = ""  # empty tokens keep their place
    tokens[6] = "\n"
    text = "".join(tokens)
    store = _store()
    record = _create(store, "a")
    await store.append_tokens("a", tokens)
    result = "".join(tokens)  # equal to the joined tokens, a different object
    await store.finish("a", COMPLETED, result=result)
    with anyio.fail_after(5):
        assert await _tokens(store, "a") == tokens
    assert record.token_count == 200
    assert list(record.tokens) == tokens
    assert record.tokens.text is result  # type: ignore[union-attr]  # one copy of the text
    assert text == result


async def test_many_tokens_replay_exactly_when_the_result_differs() -> None:
    tokens = [f"t{i} " for i in range(100)]
    store = _store()
    record = _create(store, "a")
    await store.append_tokens("a", tokens)
    await store.finish("a", COMPLETED, result="POST-PROCESSED")
    with anyio.fail_after(5):
        assert await _tokens(store, "a") == tokens
    assert record.result == "POST-PROCESSED"


async def test_a_live_reader_goes_on_exactly_across_the_compaction() -> None:
    tokens = [f"<{i}>" for i in range(100)]
    store = _store()
    _create(store, "a")
    await store.append_tokens("a", tokens[:10])
    reader = store.read_token_batches("a")
    with anyio.fail_after(5):
        seen = list(await anext(reader))
        await store.append_tokens("a", tokens[10:50])
        await store.finish("a", COMPLETED, result="".join(tokens[:50]))  # compacts the list
        seen += [token async for batch in reader for token in batch]
    assert seen == tokens[:50]


# -- retention -----------------------------------------------------------------------------


async def test_retention_by_count_drops_the_oldest_finished() -> None:
    store = _store(retention_max=2)
    for request_id in "abc":
        _create(store, request_id)
    for request_id in "cab":  # finish order, not creation order, is age
        await store.finish(request_id, COMPLETED, result="")
    assert [store.peek(i) is not None for i in "abc"] == [True, True, False]
    assert not store.in_use("c")  # its id is free again
    assert store.in_flight == 0


async def test_retention_never_drops_an_unfinished_record() -> None:
    store = _store(retention_max=1, retention_seconds=0, retention_bytes=0)
    for request_id in "abc":
        _create(store, request_id)
    await store.finish("a", COMPLETED, result="")
    assert store.peek("a") is None
    assert store.peek("b") is not None
    assert store.peek("c") is not None


async def test_retention_by_bytes_drops_the_oldest_first() -> None:
    probe = _store()
    _create(probe, "p", "x" * 1000)
    await probe.finish("p", COMPLETED, result="y" * 1000)
    size = probe.peek("p").retained_bytes()  # type: ignore[union-attr]
    store = _store(retention_bytes=int(2.5 * size))
    for request_id in "abcd":
        _create(store, request_id, "x" * 1000)
        await store.finish(request_id, COMPLETED, result="y" * 1000)
    assert [store.peek(i) is not None for i in "abcd"] == [False, False, True, True]


async def test_retention_by_age_on_the_injected_clock() -> None:
    clock = Clock()
    store = _store(retention_seconds=10, clock=clock)
    _create(store, "old")
    await store.finish("old", COMPLETED, result="")
    clock.now += 6
    _create(store, "new")
    await store.finish("new", COMPLETED, result="")
    clock.now += 4  # "old" is exactly 10 s old: still kept
    assert store.peek("old") is not None
    clock.now += 0.5  # read with no traffic since: expired on read
    assert store.peek("old") is None
    assert store.peek("new") is not None
    clock.now += 6
    _create(store, "other")
    await store.finish("other", COMPLETED, result="")  # traffic expires too
    assert not store.in_use("new")
    assert store.peek("other") is not None
