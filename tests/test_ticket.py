"""Ticket: the caller's read-only view of one request, over the request store and the token
stream; it changes nothing but asks (cancel)."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from orchestrator import (
    InferenceError,
    PipelineConfig,
    PromptRequest,
    RequestCancelled,
    RequestStatus,
    RequestTimeout,
    Ticket,
    spawn_pipeline,
)
from orchestrator._store import MemoryStore
from tests.helpers import GateWorker, prompt_for

pytestmark = pytest.mark.anyio


class Asked:
    """A canceller that records what tickets ask."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def cancel(self, request_id: str) -> bool:
        self.asked.append(f"cancel {request_id}")
        return True

    def cancel_nowait(self, request_id: str) -> bool:
        self.asked.append(f"cancel_nowait {request_id}")
        return False


def _store() -> MemoryStore:
    return MemoryStore(retention_seconds=60, retention_max=100, retention_bytes=10**9)


def _ticket(store: MemoryStore, request_id: str = "r1", canceller: Asked | None = None) -> Ticket:
    record = store.create_nowait(PromptRequest("s", "hello", request_id=request_id))
    return Ticket(record, store, canceller or Asked())


@pytest.mark.parametrize(
    "name", ["status", "text", "error", "token_count", "request_id", "request", "finished_at"]
)
async def test_the_view_has_no_setters(name: str) -> None:
    ticket = _ticket(_store())
    before = getattr(ticket, name)
    with pytest.raises(AttributeError):
        setattr(ticket, name, None)
    assert getattr(ticket, name) == before


async def test_nothing_can_be_added_to_a_ticket() -> None:
    ticket = _ticket(_store())
    with pytest.raises(AttributeError):
        ticket.finish = lambda: None  # type: ignore[attr-defined]


async def test_tickets_of_one_request_are_equal_and_hash_alike() -> None:
    store = _store()
    ticket = _ticket(store, "a")
    record = store.peek("a")
    assert record is not None
    again = Ticket(record, store, Asked())
    other = _ticket(store, "b")
    assert ticket == again
    assert hash(ticket) == hash(again)
    assert ticket != other
    assert len({ticket, again, other}) == 2
    assert ticket != "a"


async def test_the_view_tracks_the_record() -> None:
    store = _store()
    ticket = _ticket(store)
    seen = [(ticket.status, ticket.token_count, ticket.done())]
    assert (ticket.text, ticket.error) == (None, None)
    assert ticket.request.input == "hello"
    await store.start("r1")
    seen.append((ticket.status, ticket.token_count, ticket.done()))
    await store.append_tokens("r1", ["he", "llo"])
    seen.append((ticket.status, ticket.token_count, ticket.done()))
    await store.finish("r1", RequestStatus.COMPLETED, result="HELLO")
    seen.append((ticket.status, ticket.token_count, ticket.done()))
    assert seen == [
        (RequestStatus.PENDING, 0, False),
        (RequestStatus.PROCESSING, 0, False),
        (RequestStatus.PROCESSING, 2, False),
        (RequestStatus.COMPLETED, 2, True),
    ]
    assert ticket.text == "HELLO"
    assert ticket.finished_at is not None
    assert ticket.created_at <= ticket.finished_at
    assert repr(ticket) == "<Ticket r1 completed>"


async def test_result_waits_and_returns_the_text() -> None:
    store = _store()
    ticket = _ticket(store)
    waiting = asyncio.create_task(ticket.result())
    await anyio.wait_all_tasks_blocked()
    assert not waiting.done()
    await store.finish("r1", RequestStatus.COMPLETED, result="done")
    with anyio.fail_after(5):
        assert await waiting == "done"


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (RequestStatus.FAILED, InferenceError("down")),
        (RequestStatus.TIMEOUT, RequestTimeout("late")),
        (RequestStatus.CANCELLED, RequestCancelled("asked")),
    ],
)
async def test_result_raises_the_requests_own_error(
    status: RequestStatus, error: Exception
) -> None:
    store = _store()
    ticket = _ticket(store)
    await store.finish("r1", status, error=error)
    with anyio.fail_after(5), pytest.raises(type(error)) as info:
        await ticket.result()
    assert info.value is error
    assert ticket.error is error
    assert ticket.text is None


async def test_tokens_raise_the_error_after_the_tokens_produced() -> None:
    store = _store()
    ticket = _ticket(store)
    await store.append_tokens("r1", ["a", "b"])
    error = InferenceError("stream broke")
    seen: list[str] = []
    reading = asyncio.create_task(_read(ticket, seen))
    await anyio.wait_all_tasks_blocked()
    assert seen == ["a", "b"]
    await store.finish("r1", RequestStatus.FAILED, error=error)
    with anyio.fail_after(5), pytest.raises(InferenceError) as info:
        await reading
    assert info.value is error
    assert seen == ["a", "b"]


async def _read(ticket: Ticket, into: list[str]) -> None:
    async for token in ticket.tokens():
        into.append(token)


async def test_tokens_of_a_completed_request_end_cleanly_however_late() -> None:
    store = _store()
    ticket = _ticket(store)
    await store.append_tokens("r1", ["x", "y", "z"])
    await store.finish("r1", RequestStatus.COMPLETED, result="xyz")
    with anyio.fail_after(5):
        assert [t async for t in ticket.tokens()] == ["x", "y", "z"]
        assert [t async for t in ticket.tokens()] == ["x", "y", "z"]


async def test_wait_says_whether_it_finished() -> None:
    store = _store()
    ticket = _ticket(store)
    with anyio.fail_after(5):
        assert await ticket.wait(0.01) is False
        await store.finish("r1", RequestStatus.COMPLETED, result="")
        assert await ticket.wait(0.01) is True
        assert await ticket.wait() is True


async def test_cancel_and_cancel_nowait_ask_the_pipeline() -> None:
    store = _store()
    asked = Asked()
    ticket = _ticket(store, canceller=asked)
    assert await ticket.cancel() is True
    assert ticket.cancel_nowait() is False
    assert asked.asked == ["cancel r1", "cancel_nowait r1"]
    assert ticket.status is RequestStatus.PENDING  # the view itself changed nothing


async def test_cancel_returns_true_once_then_false_and_waits_for_the_call_to_unwind() -> None:
    worker = GateWorker()
    async with spawn_pipeline(worker) as handles:
        ticket = await handles.submit(PromptRequest("s", "x"))
        with anyio.fail_after(5):
            await worker.wait_started(1)
            assert await ticket.cancel() is True
        # No await since: the worker call has unwound already.
        assert (worker.active, worker.cancelled) == (0, 1)
        assert ticket.status is RequestStatus.CANCELLED
        assert await ticket.cancel() is False
        assert ticket.cancel_nowait() is False
        with pytest.raises(RequestCancelled):
            await ticket.result()


async def test_cancel_nowait_ends_the_request_at_once_and_the_call_soon_after() -> None:
    worker = GateWorker()
    config = PipelineConfig(max_concurrency=1)
    async with spawn_pipeline(worker, config) as handles:
        ticket = await handles.submit(PromptRequest("s", "x"))
        with anyio.fail_after(5):
            await worker.wait_started(1)
        assert ticket.cancel_nowait() is True
        # Like Task.cancel(): the request is over now, the call not unwound yet.
        assert ticket.done()
        assert ticket.status is RequestStatus.CANCELLED
        assert worker.active == 1
        assert ticket.cancel_nowait() is False
        assert await ticket.cancel() is False
        await anyio.wait_all_tasks_blocked()
        assert (worker.active, worker.cancelled) == (0, 1)
        worker.gate.set()  # the slot serves the next request
        with anyio.fail_after(5):
            assert await handles.infer("next") == prompt_for("next")
