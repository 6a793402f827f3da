"""Job: plain data that crosses processes, by pickle or by its JSON form."""

from __future__ import annotations

import asyncio
import json
import pickle
import time

import pytest

from orchestrator._job import Job
from orchestrator._store import MemoryStore, Record
from orchestrator._waiters import Waiters
from orchestrator.enhanced.priority import Priority
from orchestrator.types import PromptRequest, SessionId

pytestmark = pytest.mark.anyio

DATA = ("attempt", "cache_key", "context", "deadline", "id", "output", "priority", "prompt")


def _record(request: PromptRequest) -> Record:
    store = MemoryStore(retention_seconds=60, retention_max=10, retention_bytes=10**6)
    return store.create_nowait(request)


def _job(**fields: object) -> Job:
    request = PromptRequest(
        "u1", "the input", {"priority": "high", "k": "v"}, request_id="r-1", timeout=12.5
    )
    job = Job(_record(request), request, Priority.HIGH, 1000.0, **fields)  # type: ignore[arg-type]
    return job


def _same_request(a: PromptRequest, b: PromptRequest) -> None:
    assert (a.session, a.input, a.meta, a.request_id, a.timeout) == (
        b.session,
        b.input,
        b.meta,
        b.request_id,
        b.timeout,
    )


async def test_a_pickle_round_trip_keeps_every_data_field() -> None:
    job = _job(
        stream=True, cache_key="key", attempt=3, context="ctx", prompt="prompt", output="out"
    )
    clone = pickle.loads(pickle.dumps(job))
    assert type(clone) is Job
    assert repr(clone) == "<Job r-1 high attempt 3>"
    for name in (*DATA, "stream"):
        assert getattr(clone, name) == getattr(job, name), name
    assert clone.priority is Priority.HIGH
    _same_request(clone.request, job.request)
    assert clone.request.session == SessionId("u1")


async def test_pickling_leaves_the_record_behind() -> None:
    job = _job()
    # This process's record holds what cannot cross a process (here a future of this loop).
    job.record.done_waiters = Waiters([asyncio.get_running_loop().create_future()])  # type: ignore[attr-defined]
    state = job.__getstate__()
    assert "record" not in state
    assert sorted(state) == sorted((*DATA, "request", "stream"))
    clone = pickle.loads(pickle.dumps(job))
    assert not hasattr(clone, "record")  # the taker links its own
    clone.record = _record(clone.request)
    assert clone.record.id == "r-1"


async def test_the_json_form_carries_the_deadline_as_wall_clock_time() -> None:
    job = _job(stream=True, cache_key=None, attempt=2, context="ctx", prompt="the prompt")
    before = time.time()
    data = job.to_dict(now=990.0)  # 10 s left on this clock
    assert before + 10.0 <= data["deadline_at"] <= time.time() + 10.0
    assert data["priority"] == "high"  # by name
    text = json.dumps(data)  # plain JSON
    request = job.request
    elsewhere = Job.from_dict(json.loads(text), now=5.0, record=_record(request))
    # Placed on the other process's clock, less the time the job spent on its way.
    assert 15.0 - (time.time() - before) <= elsewhere.deadline <= 15.0
    assert elsewhere.priority is Priority.HIGH
    for name in ("attempt", "cache_key", "context", "id", "prompt", "stream"):
        assert getattr(elsewhere, name) == getattr(job, name), name
    _same_request(elsewhere.request, request)
    assert elsewhere.record.id == "r-1"


async def test_the_json_form_is_exactly_these_fields() -> None:
    # The form the Redis work queue carries: a job in front of Inference has no output yet.
    data = _job(output="not carried").to_dict(now=0.0)
    assert sorted(data) == [
        "attempt",
        "cache_key",
        "context",
        "deadline_at",
        "id",
        "input",
        "meta",
        "priority",
        "prompt",
        "session",
        "stream",
        "timeout",
    ]
    assert data["session"] == "u1"
    assert data["meta"] == {"priority": "high", "k": "v"}
    assert data["timeout"] == 12.5
    assert Job.from_dict(data, now=0.0, record=_job().record).output == ""


async def test_a_request_without_its_own_timeout_round_trips() -> None:
    request = PromptRequest("u1", "x", request_id="r-2")
    job = Job(_record(request), request, Priority.LOW, 50.0)
    back = Job.from_dict(job.to_dict(now=20.0), now=0.0, record=job.record)
    assert back.request.timeout is None
    assert back.priority is Priority.LOW
    assert back.deadline == pytest.approx(30.0, abs=0.5)  # less the time in between
    assert (back.stream, back.attempt, back.cache_key) == (False, 1, None)


@pytest.mark.parametrize(
    ("change", "error"),
    [({"priority": "urgent"}, ValueError), ({"session": None}, KeyError)],
)
async def test_from_dict_refuses_what_is_not_such_a_form(
    change: dict[str, object], error: type[Exception]
) -> None:
    job = _job()
    data = job.to_dict(now=0.0)
    for key, value in change.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    with pytest.raises(error):
        Job.from_dict(data, now=0.0, record=job.record)
