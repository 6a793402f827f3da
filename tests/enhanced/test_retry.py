from __future__ import annotations

import asyncio
import itertools
import random

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator import metrics
from orchestrator.enhanced.retry import Backoff, RetryPolicy, default_retry_on
from orchestrator.errors import CircuitOpen, InferenceError

pytestmark = pytest.mark.anyio


class FakeSleep:
    """Records each requested delay and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


class Flaky:
    """Raises the given errors in turn, then returns ``"ok"``."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def retryable(message: str = "503", **kwargs: float) -> InferenceError:
    return InferenceError(message, worker="w", status_code=503, retryable=True, **kwargs)


def retries(worker: str) -> float:
    return metrics.REGISTRY.get_sample_value("orchestrator_retries_total", {"worker": worker}) or 0


def policy(sleep: FakeSleep, **kwargs: object) -> RetryPolicy:
    return RetryPolicy(sleep=sleep, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("backoff", "expected"),
    [
        ("fixed", [0.5, 0.5, 0.5, 0.5, 0.5]),
        ("linear", [0.5, 1.0, 1.5, 2.0, 2.5]),
        ("exponential", [0.5, 1.0, 2.0, 3.0, 3.0]),
        (Backoff.EXPONENTIAL, [0.5, 1.0, 2.0, 3.0, 3.0]),
    ],
)
def test_delays_per_backoff_without_jitter(backoff: Backoff | str, expected: list[float]) -> None:
    p = RetryPolicy(max_attempts=6, backoff=backoff, base_delay=0.5, max_delay=3.0, jitter=False)
    assert list(p.delays()) == expected


def test_exponential_jitter_is_full_jitter_with_a_seeded_rng() -> None:
    p = RetryPolicy(max_attempts=6, base_delay=0.5, max_delay=3.0, rng=random.Random(7))
    reference = random.Random(7)
    nominal = [0.5, 1.0, 2.0, 3.0, 3.0]
    assert list(p.delays()) == [reference.uniform(0.0, d) for d in nominal]


@pytest.mark.parametrize("backoff", ["fixed", "linear"])
def test_fixed_and_linear_jitter_keep_at_least_half_the_delay(backoff: str) -> None:
    p = RetryPolicy(max_attempts=6, backoff=backoff, base_delay=0.5, rng=random.Random(3))
    reference = random.Random(3)
    nominal = [p.nominal_delay(n) for n in range(1, 6)]
    assert list(p.delays()) == [reference.uniform(d / 2, d) for d in nominal]


def test_same_seed_same_delays() -> None:
    def delays() -> list[float]:
        return list(RetryPolicy(max_attempts=5, rng=random.Random(42)).delays())

    assert delays() == delays()


@given(
    backoff=st.sampled_from(list(Backoff)),
    base=st.floats(min_value=0.0, max_value=5.0),
    extra=st.floats(min_value=0.0, max_value=100.0),
    attempts=st.integers(min_value=1, max_value=2000),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_delays_are_monotone_capped_and_jitter_stays_below_the_nominal_delay(
    backoff: Backoff, base: float, extra: float, attempts: int, seed: int
) -> None:
    plain = RetryPolicy(
        max_attempts=attempts,
        backoff=backoff,
        base_delay=base,
        max_delay=base + extra,
        jitter=False,
    )
    nominal = list(plain.delays())
    assert len(nominal) == attempts - 1
    assert all(a <= b for a, b in itertools.pairwise(nominal))
    assert all(0.0 <= d <= base + extra for d in nominal)
    jittered = RetryPolicy(
        max_attempts=attempts,
        backoff=backoff,
        base_delay=base,
        max_delay=base + extra,
        rng=random.Random(seed),
    )
    floor = 0.0 if backoff is Backoff.EXPONENTIAL else 0.5
    for d, n in zip(jittered.delays(), nominal, strict=True):
        assert floor * n <= d <= n


async def test_retries_until_success_sleeping_the_planned_delays() -> None:
    sleep = FakeSleep()
    fn = Flaky(retryable(), retryable())
    p = policy(sleep, max_attempts=3, base_delay=0.1, jitter=False)
    before = retries("w")
    assert await p.call(fn) == "ok"
    assert fn.calls == 3
    assert sleep.delays == [0.1, 0.2]
    assert retries("w") - before == 2


async def test_worker_argument_labels_the_retries_metric() -> None:
    sleep = FakeSleep()
    before = retries("labelled")
    await policy(sleep, jitter=False).call(Flaky(retryable()), worker="labelled")
    assert retries("labelled") - before == 1


async def test_attempts_exhausted_re_raises_the_last_error_unchanged() -> None:
    sleep = FakeSleep()
    errors = [retryable("first"), retryable("second"), retryable("third")]
    fn = Flaky(*errors)
    before = retries("w")
    with pytest.raises(InferenceError) as info:
        await policy(sleep, max_attempts=3, jitter=False).call(fn)
    assert info.value is errors[2]
    assert fn.calls == 3
    assert len(sleep.delays) == 2
    assert retries("w") - before == 2


async def test_non_retryable_error_is_raised_at_once() -> None:
    sleep = FakeSleep()
    error = InferenceError("bad request", status_code=400, retryable=False)
    fn = Flaky(error)
    with pytest.raises(InferenceError) as info:
        await policy(sleep).call(fn)
    assert info.value is error
    assert fn.calls == 1
    assert sleep.delays == []


async def test_other_exceptions_are_not_retried_by_default() -> None:
    fn = Flaky(ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        await policy(FakeSleep()).call(fn)
    assert fn.calls == 1


async def test_circuit_open_is_never_retried_even_if_retry_on_says_so() -> None:
    fn = Flaky(CircuitOpen("open", retry_after=5.0))
    with pytest.raises(CircuitOpen):
        await policy(FakeSleep(), retry_on=lambda exc: True).call(fn)
    assert fn.calls == 1


async def test_cancellation_is_never_retried() -> None:
    sleep = FakeSleep()
    gate = asyncio.Event()
    calls = 0

    async def hang() -> str:
        nonlocal calls
        calls += 1
        await gate.wait()
        return "late"

    task = asyncio.create_task(policy(sleep, retry_on=lambda exc: True).call(hang))
    await anyio.wait_all_tasks_blocked()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == 1
    assert sleep.delays == []


async def test_retry_after_is_honoured_and_capped_at_max_delay() -> None:
    sleep = FakeSleep()
    fn = Flaky(retryable(retry_after=2.5), retryable(retry_after=60.0), retryable(retry_after=0.01))
    p = policy(sleep, max_attempts=4, base_delay=0.1, max_delay=5.0, jitter=False)
    assert await p.call(fn) == "ok"
    assert sleep.delays == [2.5, 5.0, 0.4]  # at least retry_after, at most max_delay


async def test_custom_retry_on_decides() -> None:
    sleep = FakeSleep()
    fn = Flaky(ConnectionResetError("reset"))
    p = policy(sleep, retry_on=lambda exc: isinstance(exc, ConnectionError), jitter=False)
    assert await p.call(fn, worker="custom") == "ok"
    assert sleep.delays == [0.1]


async def test_a_single_attempt_never_retries() -> None:
    fn = Flaky(retryable())
    with pytest.raises(InferenceError):
        await policy(FakeSleep(), max_attempts=1).call(fn)
    assert fn.calls == 1


def test_default_retry_on() -> None:
    assert default_retry_on(retryable())
    assert not default_retry_on(InferenceError("no", retryable=False))
    assert not default_retry_on(TimeoutError())


def test_backoff_parse() -> None:
    assert Backoff.parse("Linear") is Backoff.LINEAR
    assert Backoff.parse(Backoff.FIXED) is Backoff.FIXED
    assert str(Backoff.EXPONENTIAL) == "exponential"
    with pytest.raises(ValueError, match="unknown backoff"):
        Backoff.parse("fibonacci")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"base_delay": -0.1}, "base_delay"),
        ({"base_delay": float("nan")}, "base_delay"),
        ({"base_delay": 2.0, "max_delay": 1.0}, "max_delay"),
        ({"max_delay": float("inf")}, "max_delay"),
        ({"backoff": "random"}, "backoff"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_repr_shows_the_schedule() -> None:
    assert repr(RetryPolicy(backoff="linear", jitter=False)) == (
        "RetryPolicy(max_attempts=3, backoff='linear', base_delay=0.1, max_delay=10.0, "
        "jitter=False)"
    )
