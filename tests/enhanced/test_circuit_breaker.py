from __future__ import annotations

import asyncio
import logging

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator import metrics
from orchestrator.enhanced.circuit_breaker import CircuitBreaker, CircuitState, default_is_failure
from orchestrator.errors import CircuitOpen, InferenceError

pytestmark = pytest.mark.anyio

CLOSED, HALF_OPEN, OPEN = CircuitState.CLOSED, CircuitState.HALF_OPEN, CircuitState.OPEN


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gauge(name: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(
        "orchestrator_circuit_breaker_state", {"breaker": name}
    )


async def ok() -> str:
    return "ok"


async def backend_down() -> str:
    raise InferenceError("503 from backend", worker="w", status_code=503, retryable=True)


async def fail_times(breaker: CircuitBreaker, n: int) -> None:
    for _ in range(n):
        with pytest.raises(InferenceError):
            await breaker.call(backend_down)


def make(clock: FakeClock, name: str, **kwargs: int | float) -> CircuitBreaker:
    return CircuitBreaker(
        failure_threshold=int(kwargs.get("failure_threshold", 3)),
        success_threshold=float(kwargs.get("success_threshold", 0.8)),
        half_open_max_calls=int(kwargs.get("half_open_max_calls", 5)),
        open_timeout=float(kwargs.get("open_timeout", 30.0)),
        name=name,
        clock=clock,
    )


async def test_consecutive_failures_open_the_circuit_and_calls_fail_fast() -> None:
    clock = FakeClock()
    breaker = make(clock, "t-open")
    assert gauge("t-open") == 0
    await fail_times(breaker, 2)
    assert breaker.state is CLOSED
    await fail_times(breaker, 1)
    assert breaker.state is OPEN
    assert gauge("t-open") == 2
    called = False

    async def never() -> str:
        nonlocal called
        called = True
        return "no"

    clock.now += 12.5
    with pytest.raises(CircuitOpen) as info:
        await breaker.call(never)
    assert not called
    assert info.value.retry_after == pytest.approx(17.5)
    assert info.value.retry_in == info.value.retry_after  # the deprecated alias
    assert info.value.worker == "t-open"


async def test_a_success_resets_the_consecutive_failure_count() -> None:
    breaker = make(FakeClock(), "t-reset")
    await fail_times(breaker, 2)
    assert await breaker.call(ok) == "ok"
    assert breaker.failures == 0
    await fail_times(breaker, 2)
    assert breaker.state is CLOSED


async def test_full_cycle_closed_open_half_open_closed() -> None:
    clock = FakeClock()
    breaker = make(clock, "t-cycle", half_open_max_calls=5, success_threshold=0.8)
    await fail_times(breaker, 3)
    assert breaker.state is OPEN
    clock.now += 29.999
    assert breaker.state is OPEN
    clock.now += 0.001
    assert breaker.state is HALF_OPEN
    assert gauge("t-cycle") == 1
    await fail_times(breaker, 1)  # one failure of five is within 0.8
    for _ in range(3):
        assert await breaker.call(ok) == "ok"
        assert breaker.state is HALF_OPEN  # decided only when all five probes finished
    assert await breaker.call(ok) == "ok"
    assert breaker.state is CLOSED
    assert gauge("t-cycle") == 0


async def test_failing_probes_reopen_the_circuit_as_soon_as_closing_is_impossible() -> None:
    clock = FakeClock()
    breaker = make(clock, "t-reopen", half_open_max_calls=5, success_threshold=0.8)
    await fail_times(breaker, 3)
    clock.now += 30.0
    assert await breaker.call(ok) == "ok"
    await fail_times(breaker, 1)
    assert breaker.state is HALF_OPEN
    await fail_times(breaker, 1)  # 3 of 5 at best now: below 0.8
    assert breaker.state is OPEN
    assert gauge("t-reopen") == 2
    with pytest.raises(CircuitOpen) as info:
        await breaker.call(ok)
    assert info.value.retry_after == pytest.approx(30.0)


async def test_half_open_admits_only_half_open_max_calls_probes() -> None:
    clock = FakeClock()
    breaker = make(clock, "t-slots", half_open_max_calls=2, success_threshold=1.0)
    await fail_times(breaker, 3)
    clock.now += 30.0
    first, second = breaker.before_call(), breaker.before_call()
    with pytest.raises(CircuitOpen, match="probe calls are taken") as info:
        breaker.before_call()
    assert info.value.retry_after == 0.0
    breaker.record_success(first)
    with pytest.raises(CircuitOpen):  # finished probes keep their slot until the decision
        breaker.before_call()
    breaker.record_success(second)
    assert breaker.state is CLOSED


async def test_cancellation_is_not_a_failure_and_frees_a_probe_slot() -> None:
    clock = FakeClock()
    breaker = make(clock, "t-cancel", half_open_max_calls=1, success_threshold=1.0)
    gate = asyncio.Event()

    async def hang() -> str:
        await gate.wait()
        return "late"

    # Closed: cancelled calls are not counted.
    for _ in range(5):
        task = asyncio.create_task(breaker.call(hang))
        await anyio.wait_all_tasks_blocked()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert breaker.state is CLOSED
    assert breaker.failures == 0

    await fail_times(breaker, 3)
    clock.now += 30.0
    probe = asyncio.create_task(breaker.call(hang))
    await anyio.wait_all_tasks_blocked()
    with pytest.raises(CircuitOpen):
        await breaker.call(ok)  # the only slot is taken
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert breaker.state is HALF_OPEN
    assert await breaker.call(ok) == "ok"  # the slot was freed
    assert breaker.state is CLOSED


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
async def test_client_errors_are_not_counted(status: int) -> None:
    breaker = make(FakeClock(), f"t-4xx-{status}", failure_threshold=1)

    async def bad_request() -> str:
        raise InferenceError("bad request", status_code=status)

    for _ in range(3):
        with pytest.raises(InferenceError):
            await breaker.call(bad_request)
    assert breaker.state is CLOSED


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, None])
async def test_timeouts_throttling_and_server_errors_are_counted(status: int | None) -> None:
    breaker = make(FakeClock(), f"t-5xx-{status}", failure_threshold=1)

    async def failing() -> str:
        raise InferenceError("failed", status_code=status)

    with pytest.raises(InferenceError):
        await breaker.call(failing)
    assert breaker.state is OPEN


def test_default_is_failure() -> None:
    assert default_is_failure(RuntimeError("any exception"))
    assert default_is_failure(TimeoutError())
    assert not default_is_failure(CircuitOpen("another breaker", retry_after=1.0))
    assert not default_is_failure(InferenceError("not found", status_code=404))


async def test_custom_is_failure_decides() -> None:
    breaker = CircuitBreaker(
        failure_threshold=1, name="t-custom", is_failure=lambda e: isinstance(e, KeyError)
    )
    breaker.record_failure(ValueError("ignored"))
    assert breaker.state is CLOSED
    breaker.record_failure(asyncio.CancelledError())  # never reaches is_failure
    assert breaker.state is CLOSED
    breaker.record_failure(KeyError("counted"))
    assert breaker.state is OPEN


async def test_guard_records_the_blocks_outcome() -> None:
    clock = FakeClock()
    breaker = make(clock, "t-guard", failure_threshold=2)
    for _ in range(2):
        with pytest.raises(InferenceError):
            async with breaker.guard():
                await backend_down()
    assert breaker.state is OPEN
    with pytest.raises(CircuitOpen):
        async with breaker.guard():
            pytest.fail("the block must not run")
    clock.now += 30.0
    for _ in range(5):
        async with breaker.guard():
            pass
    assert breaker.state is CLOSED


async def test_a_call_from_an_earlier_state_does_not_count_as_a_probe() -> None:
    clock = FakeClock()
    breaker = make(clock, "t-stale", half_open_max_calls=1, success_threshold=1.0)
    slow = breaker.before_call()  # started while closed
    await fail_times(breaker, 3)
    clock.now += 30.0
    probe = breaker.before_call()
    breaker.record_failure(InferenceError("old news", status_code=503), slow)
    assert breaker.state is HALF_OPEN
    breaker.record_success(probe)
    assert breaker.state is CLOSED


async def test_transitions_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    breaker = make(clock, "t-log", half_open_max_calls=1, success_threshold=1.0)
    with caplog.at_level(logging.INFO, logger="orchestrator.enhanced.circuit_breaker"):
        await fail_times(breaker, 3)
        clock.now += 30.0
        await breaker.call(ok)
    levels = [(r.levelno, r.getMessage().split(" (")[0].split(":")[0]) for r in caplog.records]
    assert levels == [
        (logging.WARNING, "circuit breaker 't-log' opened"),
        (logging.INFO, "circuit breaker 't-log' half-open"),
        (logging.INFO, "circuit breaker 't-log' closed"),
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"success_threshold": 0.0}, "success_threshold"),
        ({"success_threshold": 1.5}, "success_threshold"),
        ({"half_open_max_calls": 0}, "half_open_max_calls"),
        ({"open_timeout": -1.0}, "open_timeout"),
        ({"open_timeout": float("nan")}, "open_timeout"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CircuitBreaker(**kwargs)  # type: ignore[arg-type]


@given(
    st.integers(min_value=1, max_value=10),
    st.floats(min_value=0.05, max_value=1.0),
    st.lists(st.booleans(), min_size=1, max_size=10),
)
def test_half_open_closes_exactly_when_the_success_fraction_is_reached(
    n: int, threshold: float, outcomes: list[bool]
) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(
        failure_threshold=1,
        success_threshold=threshold,
        half_open_max_calls=n,
        open_timeout=1.0,
        name="t-prop",
        clock=clock,
    )
    breaker.record_failure(RuntimeError("open it"))
    clock.now += 1.0
    tokens = [breaker.before_call() for _ in range(n)]
    outcomes = (outcomes * n)[:n]
    for token, success in zip(tokens, outcomes, strict=True):
        if breaker.state is not HALF_OPEN:
            break
        if success:
            breaker.record_success(token)
        else:
            breaker.record_failure(RuntimeError("probe failed"), token)
    expected = CLOSED if sum(outcomes) / n >= threshold else OPEN
    assert breaker.state is expected
