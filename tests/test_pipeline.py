"""The pipeline end to end, in process: every accepted request ends exactly once."""

from __future__ import annotations

import asyncio
import gc
import time
import warnings
from typing import TYPE_CHECKING

import anyio
import pytest

from orchestrator import (
    EchoWorker,
    InferenceError,
    InvalidRequest,
    Overloaded,
    PipelineClosed,
    PipelineConfig,
    PromptRequest,
    RequestCancelled,
    RequestStatus,
    RequestTimeout,
    StageError,
    spawn_pipeline,
)
from orchestrator.enhanced import RateLimiter
from tests.helpers import GateWorker, prompt_for

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from orchestrator.types import PostOutput

pytestmark = pytest.mark.anyio

TERMINAL = {
    RequestStatus.COMPLETED,
    RequestStatus.FAILED,
    RequestStatus.TIMEOUT,
    RequestStatus.CANCELLED,
}


async def test_result_is_the_seed_template_echoed() -> None:
    async with spawn_pipeline(EchoWorker.with_delay(0)) as handles:
        text = await handles.infer("What is the capital of France?", session_id="user-123")
    assert text == prompt_for("What is the capital of France?")


async def test_whitespace_survives_the_round_trip() -> None:
    config = PipelineConfig(template="{input}")
    async with spawn_pipeline(EchoWorker.with_delay(0), config) as handles:
        text = await handles.infer("  two  spaces\nand a newline\n\n")
    assert text == "  two  spaces\nand a newline\n\n"


async def test_ten_thousand_requests_all_accounted_for() -> None:
    config = PipelineConfig(rag_capacity=20_000)
    async with spawn_pipeline(EchoWorker.with_delay(0), config) as handles:
        tickets = [
            await handles.submit(PromptRequest(f"s{i % 50}", f"request {i}")) for i in range(10_000)
        ]
        results = await asyncio.gather(*(t.result() for t in tickets))
    assert all(r == prompt_for(f"request {i}") for i, r in enumerate(results))
    assert {t.status for t in tickets} == {RequestStatus.COMPLETED}
    assert len({t.request_id for t in tickets}) == 10_000


async def test_overload_sheds_at_admission_and_loses_no_accepted_request() -> None:
    worker = GateWorker()
    config = PipelineConfig(
        rag_capacity=2,
        assemble_capacity=1,
        inference_capacity=1,
        post_capacity=1,
        stream_capacity=1,
        max_concurrency=1,
    )
    accepted = []
    shed = 0
    stage = ""
    async with spawn_pipeline(worker, config) as handles:
        for i in range(50):
            try:
                accepted.append(await handles.submit(PromptRequest("s", f"r{i}")))
            except Overloaded as exc:
                shed += 1
                stage = exc.stage
            await anyio.wait_all_tasks_blocked()
        assert shed > 0
        assert stage == "rag"
        assert len(accepted) + shed == 50
        worker.gate.set()
        results = await asyncio.gather(*(t.result() for t in accepted))
    assert results == [prompt_for(t.request.input) for t in accepted]


async def test_worker_exception_fails_only_its_own_request() -> None:
    class BoomWorker:
        name = "boom"

        async def infer(self, prompt: str) -> list[str]:
            if "boom" in prompt:
                raise ValueError("model exploded")
            return [prompt]

        async def stream(self, prompt: str) -> AsyncIterator[str]:
            for token in await self.infer(prompt):
                yield token

    async with spawn_pipeline(BoomWorker()) as handles:
        bad = await handles.submit(PromptRequest("s", "boom"))
        good = await handles.submit(PromptRequest("s", "fine"))
        with pytest.raises(InferenceError, match="model exploded") as info:
            await bad.result()
        assert await good.result() == prompt_for("fine")
    assert bad.status is RequestStatus.FAILED
    assert info.value.worker == "boom"
    assert isinstance(info.value.__cause__, ValueError)


async def test_inference_error_from_worker_is_kept_as_is() -> None:
    worker = GateWorker(open_=True)
    worker.fail_with = InferenceError("rate limited", status_code=429, retryable=True)
    async with spawn_pipeline(worker) as handles:
        ticket = await handles.submit(PromptRequest("s", "x"))
        with pytest.raises(InferenceError) as info:
            await ticket.result()
    assert info.value is worker.fail_with


async def test_deadline_in_flight_times_out_and_cancels_the_worker_call() -> None:
    worker = GateWorker()
    async with spawn_pipeline(worker) as handles:
        ticket = await handles.submit(PromptRequest("s", "slow", timeout=0.05))
        with pytest.raises(RequestTimeout):
            await ticket.result()
        assert ticket.status is RequestStatus.TIMEOUT
        await handles.shutdown()
    assert worker.cancelled == 1
    assert worker.active == 0


async def test_deadline_passed_in_queue_never_reaches_the_worker() -> None:
    worker = GateWorker()
    async with spawn_pipeline(worker, PipelineConfig(max_concurrency=1)) as handles:
        first = await handles.submit(PromptRequest("s", "first"))
        await worker.wait_started(1)
        queued = await handles.submit(PromptRequest("s", "queued", timeout=0.02))
        with pytest.raises(RequestTimeout):
            await queued.result()
        worker.gate.set()
        assert await first.result() == prompt_for("first")
    assert worker.prompts == [prompt_for("first")]


async def test_cancel_while_queued_never_reaches_the_worker() -> None:
    worker = GateWorker()
    async with spawn_pipeline(worker, PipelineConfig(max_concurrency=1)) as handles:
        first = await handles.submit(PromptRequest("s", "first"))
        await worker.wait_started(1)
        queued = await handles.submit(PromptRequest("s", "queued"))
        assert await queued.cancel() is True
        assert await queued.cancel() is False
        worker.gate.set()
        await first.result()
        with pytest.raises(RequestCancelled):
            await queued.result()
    assert queued.status is RequestStatus.CANCELLED
    assert worker.prompts == [prompt_for("first")]


async def test_cancel_in_flight_reaches_the_worker_call() -> None:
    worker = GateWorker()
    async with spawn_pipeline(worker) as handles:
        ticket = await handles.submit(PromptRequest("s", "x"))
        await worker.wait_started(1)
        assert ticket.status is RequestStatus.PROCESSING
        assert await ticket.cancel() is True
        assert worker.cancelled == 1
        assert str(ticket.status) == "cancelled"


async def test_cancelling_a_waiter_does_not_cancel_the_request() -> None:
    worker = GateWorker()
    async with spawn_pipeline(worker) as handles:
        ticket = await handles.submit(PromptRequest("s", "x"))
        with anyio.move_on_after(0.01):
            await ticket.result()
        assert not ticket.done()
        worker.gate.set()
        assert await ticket.result() == prompt_for("x")
    assert worker.cancelled == 0


async def test_wait_with_timeout_reports_whether_it_finished() -> None:
    worker = GateWorker()
    async with spawn_pipeline(worker) as handles:
        ticket = await handles.submit(PromptRequest("s", "x"))
        assert await ticket.wait(0.01) is False
        worker.gate.set()
        assert await ticket.wait(5) is True


async def test_shutdown_drains_requests_in_flight() -> None:
    worker = GateWorker()
    handles = spawn_pipeline(worker)
    tickets = [await handles.submit(PromptRequest("s", f"r{i}")) for i in range(20)]
    await worker.wait_started(20)
    shutting = asyncio.create_task(handles.shutdown())
    await anyio.wait_all_tasks_blocked()
    with pytest.raises(PipelineClosed):
        await handles.submit(PromptRequest("s", "late"))
    assert not shutting.done()
    worker.gate.set()
    await shutting
    assert [t.status for t in tickets] == [RequestStatus.COMPLETED] * 20


async def test_shutdown_after_drain_timeout_fails_leftovers() -> None:
    worker = GateWorker()
    handles = spawn_pipeline(worker)
    ticket = await handles.submit(PromptRequest("s", "stuck"))
    await worker.wait_started(1)
    await handles.shutdown(drain_timeout=0.01)
    assert ticket.status is RequestStatus.FAILED
    assert isinstance(ticket.error, PipelineClosed)
    assert worker.cancelled == 1
    await handles.shutdown()  # a second call is harmless


async def test_priority_order_critical_high_normal_low_fifo_within_level() -> None:
    worker = GateWorker()
    async with spawn_pipeline(worker, PipelineConfig(max_concurrency=1)) as handles:
        blocker = await handles.submit(PromptRequest("s", "blocker"))
        await worker.wait_started(1)
        order = ["low", "normal", "high", "critical", "low", "high", None]
        tickets = []
        for i, level in enumerate(order):
            meta = {"priority": level} if level else {}
            tickets.append(await handles.submit(PromptRequest("s", f"{i}-{level}", meta=meta)))
        await anyio.wait_all_tasks_blocked()  # all reached the inference queue
        worker.gate.set()
        await asyncio.gather(blocker.result(), *(t.result() for t in tickets))
    served = [p.split("User Query: ")[1].split("\n")[0] for p in worker.prompts[1:]]
    assert served == ["3-critical", "2-high", "5-high", "1-normal", "6-None", "0-low", "4-low"]


@pytest.mark.parametrize("policies", [False, True], ids=["fast-path", "with-policies"])
async def test_unknown_priority_is_refused_at_submit(policies: bool) -> None:
    config = PipelineConfig(rate_limiter=RateLimiter(10, 60) if policies else None)
    async with spawn_pipeline(EchoWorker.with_delay(0), config) as handles:
        with pytest.raises(InvalidRequest, match="unknown priority") as info:
            await handles.submit(PromptRequest("s", "x", meta={"priority": "urgent"}))
        assert handles.in_flight == 0
    assert isinstance(info.value, ValueError)  # what callers caught before


async def test_full_inference_queue_displaces_lower_priority_work() -> None:
    worker = GateWorker()
    config = PipelineConfig(max_concurrency=1, inference_capacity=2)
    async with spawn_pipeline(worker, config) as handles:
        blocker = await handles.submit(PromptRequest("s", "blocker"))
        await worker.wait_started(1)
        low1 = await handles.submit(PromptRequest("s", "low1", meta={"priority": "low"}))
        low2 = await handles.submit(PromptRequest("s", "low2", meta={"priority": "low"}))
        await anyio.wait_all_tasks_blocked()
        high = await handles.submit(PromptRequest("s", "high", meta={"priority": "high"}))
        await anyio.wait_all_tasks_blocked()
        assert low2.status is RequestStatus.FAILED
        assert isinstance(low2.error, Overloaded)
        worker.gate.set()
        await asyncio.gather(blocker.result(), high.result(), low1.result())
    served = [p.split("User Query: ")[1].split("\n")[0] for p in worker.prompts]
    assert served == ["blocker", "high", "low1"]


async def test_a_failing_hook_fails_its_request_and_the_stage_keeps_serving() -> None:
    def retriever(request: PromptRequest) -> str:
        if request.input == "bad":
            raise KeyError("no such document")
        return "ctx"

    config = PipelineConfig(retriever=retriever, template="{context}|{input}")
    async with spawn_pipeline(EchoWorker.with_delay(0), config) as handles:
        bad = await handles.submit(PromptRequest("s", "bad"))
        good = await handles.submit(PromptRequest("s", "good"))
        with pytest.raises(StageError) as info:
            await bad.result()
        assert await good.result() == "ctx|good"
    assert info.value.stage == "rag"
    assert isinstance(info.value.__cause__, KeyError)


async def test_a_hook_returning_the_wrong_type_fails_clearly() -> None:
    config = PipelineConfig(template=lambda request, context: 42)  # type: ignore[arg-type,return-value]
    async with spawn_pipeline(EchoWorker.with_delay(0), config) as handles:
        with pytest.raises(StageError, match="expected str"):
            await handles.infer("x")


async def test_async_hooks_run_concurrently_within_a_stage() -> None:
    entered = 0
    both_in = asyncio.Event()

    async def retriever(request: PromptRequest) -> str:
        nonlocal entered
        entered += 1
        if entered == 2:
            both_in.set()
        await both_in.wait()  # would deadlock if the stage ran one hook at a time
        return f"doc for {request.input}"

    config = PipelineConfig(retriever=retriever, template="{context}")
    async with spawn_pipeline(EchoWorker.with_delay(0), config) as handles:
        with anyio.fail_after(5):
            a, b = await asyncio.gather(handles.infer("a"), handles.infer("b"))
    assert (a, b) == ("doc for a", "doc for b")


async def test_post_processors_and_sinks_see_the_output_in_order() -> None:
    seen: list[str] = []

    async def shout(request: PromptRequest, text: str) -> str:
        return text.upper()

    def exclaim(request: PromptRequest, text: str) -> str:
        return text + "!"

    async def record(output: PostOutput) -> None:
        seen.append(f"{output.request.session}:{output.text}")

    config = PipelineConfig(
        template="{input}", post_processors=[shout, exclaim], sinks=[record, lambda o: None]
    )
    async with spawn_pipeline(EchoWorker.with_delay(0), config) as handles:
        assert await handles.infer("hi there", session_id="u1") == "HI THERE!"
    assert seen == ["u1:HI THERE!"]


async def test_a_failing_sink_fails_the_request() -> None:
    def broken(output: PostOutput) -> None:
        raise RuntimeError("disk full")

    async with spawn_pipeline(EchoWorker.with_delay(0), PipelineConfig(sinks=[broken])) as handles:
        with pytest.raises(StageError, match="disk full") as info:
            await handles.infer("x")
    assert info.value.stage == "stream"


async def test_tokens_arrive_while_the_worker_produces_them() -> None:
    worker = GateWorker(open_=True)
    worker.token_gates = [asyncio.Event() for _ in range(3)]
    config = PipelineConfig(template="{input}")
    async with spawn_pipeline(worker, config) as handles:
        ticket = await handles.submit(PromptRequest("s", "one two three"), stream=True)
        tokens = ticket.tokens()
        worker.token_gates[0].set()
        assert await anext(tokens) == "one"
        assert ticket.status is RequestStatus.PROCESSING  # the worker is still producing
        worker.token_gates[1].set()
        assert await anext(tokens) == " two"
        worker.token_gates[2].set()
        assert [t async for t in tokens] == [" three"]
        assert await ticket.result() == "one two three"


async def test_token_batches_hold_what_waited_and_a_lone_token_alone() -> None:
    worker = GateWorker(open_=True)
    worker.token_gates = [asyncio.Event() for _ in range(2)]
    prompt = "one two " + " ".join(f"w{i}" for i in range(50))
    async with spawn_pipeline(worker, PipelineConfig(template="{input}")) as handles:
        ticket = await handles.submit(PromptRequest("s", prompt), stream=True)
        batches = ticket.token_batches()
        worker.token_gates[0].set()
        assert await anext(batches) == ["one"]  # not held back for company
        worker.token_gates[1].set()  # the rest come in one loop turn
        rest = [list(batch) async for batch in batches]
        assert rest == [[" two", *(f" w{i}" for i in range(50))]]
        assert await ticket.result() == prompt
        replayed = [list(batch) async for batch in ticket.token_batches()]
        assert replayed == [["one", " two", *(f" w{i}" for i in range(50))]]
        assert [t async for t in ticket.tokens()] == replayed[0]


async def test_tokens_replay_from_the_first_however_late() -> None:
    config = PipelineConfig(template="{input}")
    async with spawn_pipeline(EchoWorker.with_delay(0), config) as handles:
        ticket = await handles.submit(PromptRequest("s", "a b c"))
        await ticket.result()
        assert [t async for t in ticket.tokens()] == ["a", " b", " c"]


async def test_tokens_raise_the_request_error_at_the_end() -> None:
    worker = GateWorker(open_=True)
    worker.fail_with = InferenceError("provider down")
    async with spawn_pipeline(worker) as handles:
        ticket = await handles.submit(PromptRequest("s", "x"), stream=True)
        with pytest.raises(InferenceError, match="provider down"):
            async for _ in ticket.tokens():
                pass


async def test_get_finds_tickets_and_retention_is_bounded() -> None:
    config = PipelineConfig(retention_max=3)
    async with spawn_pipeline(EchoWorker.with_delay(0), config) as handles:
        tickets = [await handles.submit(PromptRequest("s", f"r{i}")) for i in range(5)]
        await asyncio.gather(*(t.result() for t in tickets))
        assert handles.get(tickets[0].request_id) is None
        assert handles.get(tickets[4].request_id) == tickets[4]
        assert handles.get("no-such-id") is None


async def test_retention_expires_by_age_even_when_traffic_stops() -> None:
    now = [1000.0]
    config = PipelineConfig(retention_seconds=0.5, clock=lambda: now[0])
    async with spawn_pipeline(EchoWorker.with_delay(0), config) as handles:
        ticket = await handles.submit(PromptRequest("s", "a"))
        await ticket.result()
        now[0] += 0.4
        assert handles.get(ticket.request_id) == ticket
        now[0] += 0.2  # 0.6 s after it finished, and no other request since
        assert handles.get(ticket.request_id) is None


async def test_retention_expires_by_age() -> None:
    config = PipelineConfig(retention_seconds=0)
    async with spawn_pipeline(EchoWorker.with_delay(0), config) as handles:
        first = await handles.submit(PromptRequest("s", "a"))
        await first.result()
        second = await handles.submit(PromptRequest("s", "b"))
        await second.result()
        assert handles.get(first.request_id) is None


async def test_request_ids_are_unique_per_pipeline() -> None:
    worker = GateWorker()
    async with spawn_pipeline(worker) as handles:
        await handles.submit(PromptRequest("s", "x", request_id="fixed"))
        with pytest.raises(InvalidRequest, match="already in use"):
            await handles.submit(PromptRequest("s", "y", request_id="fixed"))
        worker.gate.set()


async def test_input_tx_send_waits_for_room_instead_of_shedding() -> None:
    worker = GateWorker()
    config = PipelineConfig(
        rag_capacity=1, assemble_capacity=1, inference_capacity=1, max_concurrency=1
    )
    async with spawn_pipeline(worker, config) as handles:
        sends = [
            asyncio.create_task(handles.input_tx.send(PromptRequest("s", f"r{i}")))
            for i in range(8)
        ]
        await anyio.wait_all_tasks_blocked()
        assert not all(s.done() for s in sends)  # some wait for room
        worker.gate.set()
        tickets = await asyncio.gather(*sends)
        results = await asyncio.gather(*(t.result() for t in tickets))
    assert sorted(results) == sorted(prompt_for(f"r{i}") for i in range(8))


async def test_shutdown_fails_a_send_waiting_for_room_at_once() -> None:
    # The reproduction: every capacity 1, a worker that never answers (the 3 s
    # worker), a producer blocked in input_tx.send() on the full pipeline. Before, the
    # producer was still blocked 3 s after shutdown returned.
    worker = GateWorker()
    config = PipelineConfig(
        rag_capacity=1,
        assemble_capacity=1,
        inference_capacity=1,
        post_capacity=1,
        stream_capacity=1,
        max_concurrency=1,
    )
    handles = spawn_pipeline(worker, config)
    accepted = []

    async def produce() -> None:
        for i in range(100):
            accepted.append(await handles.input_tx.send(PromptRequest("s", f"r{i}")))

    producer = asyncio.create_task(produce())
    with anyio.fail_after(5):
        await worker.wait_started(1)
    await anyio.wait_all_tasks_blocked()
    assert not producer.done()  # blocked: the pipeline is full
    assert 1 < len(accepted) < 100
    start = time.monotonic()
    shutting = asyncio.create_task(handles.shutdown(drain_timeout=0.2))
    with anyio.fail_after(5), pytest.raises(PipelineClosed):
        await producer
    assert not shutting.done()  # the producer failed as shutdown began, not when it ended
    with anyio.fail_after(5):
        await shutting
    assert time.monotonic() - start < 1.0
    assert [t.status for t in accepted] == [RequestStatus.FAILED] * len(accepted)
    assert all(isinstance(t.error, PipelineClosed) for t in accepted)
    assert worker.cancelled == 1


def test_a_pipeline_dropped_without_shutdown_warns_when_its_loop_closes() -> None:
    # The warning is raised in the pipeline's supervisor task as asyncio.run() cancels the
    # tasks left; pytest.warns records it (under this suite's "error" filter alone, it
    # would end that task and reach only the loop's exception handler).
    tickets = []

    async def main() -> None:
        handles = spawn_pipeline(GateWorker())
        tickets.append(await handles.submit(PromptRequest("s", "never answered")))
        # The pipeline running, the call in flight. (Dropped before its stage tasks ever ran,
        # it also leaves "coroutine ... was never awaited" RuntimeWarnings: anyio 4.16 wraps
        # each task's coroutine, and asyncio.run() cancels the wrapper before it starts.)
        await anyio.wait_all_tasks_blocked()

    with pytest.warns(ResourceWarning) as record:
        asyncio.run(main())
    gc.collect()  # any other warning (a coroutine never awaited...) fails the test here
    assert len(record) == 1
    assert str(record[0].message) == (
        "a pipeline was not shut down: use `async with spawn_pipeline(...)` or "
        "`await handles.shutdown()`"
    )
    [ticket] = tickets
    assert ticket.status is RequestStatus.FAILED  # ended, not lost
    assert isinstance(ticket.error, PipelineClosed)


def test_a_pipeline_shut_down_does_not_warn() -> None:
    async def main() -> None:
        async with spawn_pipeline(EchoWorker.with_delay(0)) as handles:
            await handles.infer("x")

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        asyncio.run(main())
        gc.collect()
    assert [str(w.message) for w in record] == []


async def test_spawn_pipeline_refuses_a_non_worker() -> None:
    with pytest.raises(TypeError, match="ModelWorker"):
        spawn_pipeline(object())  # type: ignore[arg-type]


async def test_every_status_is_terminal_after_mixed_chaos() -> None:
    worker = GateWorker()
    config = PipelineConfig(rag_capacity=64, max_concurrency=4)
    async with spawn_pipeline(worker, config) as handles:
        tickets = []
        for i in range(60):
            timeout = 0.01 if i % 7 == 0 else None
            tickets.append(await handles.submit(PromptRequest("s", f"r{i}", timeout=timeout)))
        for t in tickets[::5]:
            await t.cancel()
        worker.gate.set()
        for t in tickets:
            await t.wait()
    assert all(t.status in TERMINAL for t in tickets)
    assert handles.in_flight == 0


async def test_cancelling_one_call_leaves_its_slot_serving_the_next() -> None:
    worker = GateWorker()
    async with spawn_pipeline(worker, PipelineConfig(max_concurrency=1)) as handles:
        first = await handles.submit(PromptRequest("s", "first"))
        await worker.wait_started(1)
        second = await handles.submit(PromptRequest("s", "second"))
        with anyio.fail_after(5):  # waits for the first call to unwind, not for the slot
            assert await first.cancel() is True
        await worker.wait_started(2)
        assert second.status is RequestStatus.PROCESSING
        worker.gate.set()
        assert await second.result() == prompt_for("second")
    assert worker.cancelled == 1


async def test_a_burst_larger_than_the_pipeline_waits_for_room_when_asked() -> None:
    config = PipelineConfig(rag_capacity=4, assemble_capacity=4, inference_capacity=4)
    async with spawn_pipeline(EchoWorker.with_delay(0.001), config) as handles:
        with pytest.raises(Overloaded):
            await asyncio.gather(*(handles.infer(f"p{i}") for i in range(200)))
        texts = await asyncio.gather(*(handles.infer(f"q{i}", wait=True) for i in range(200)))
    assert texts == [prompt_for(f"q{i}") for i in range(200)]
