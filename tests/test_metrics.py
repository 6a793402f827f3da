from __future__ import annotations

import asyncio

import anyio
import httpx
import pytest

from orchestrator import (
    EchoWorker,
    Overloaded,
    PipelineConfig,
    PromptRequest,
    metrics,
    spawn_pipeline,
)
from tests.helpers import GateWorker

pytestmark = pytest.mark.anyio


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def test_requests_and_durations_move_per_stage() -> None:
    before = {s: sample("orchestrator_requests_total", stage=s) for s in metrics.STAGES}
    count_before = sample("orchestrator_stage_duration_seconds_count", stage="inference")
    async with spawn_pipeline(EchoWorker.with_delay(0)) as handles:
        await asyncio.gather(*(handles.infer(f"r{i}") for i in range(7)))
    for stage in metrics.STAGES:
        assert sample("orchestrator_requests_total", stage=stage) - before[stage] == 7
    assert (
        sample("orchestrator_stage_duration_seconds_count", stage="inference") - count_before == 7
    )


async def test_shed_and_errors_are_counted() -> None:
    worker = GateWorker()
    config = PipelineConfig(rag_capacity=1, assemble_capacity=1, max_concurrency=1)
    shed_before = sample("orchestrator_requests_shed_total", stage="rag")
    async with spawn_pipeline(worker, config) as handles:
        shed = 0
        for i in range(10):
            try:
                await handles.submit(PromptRequest("s", f"r{i}"))
            except Overloaded:
                shed += 1
        assert shed > 0
        assert sample("orchestrator_requests_shed_total", stage="rag") - shed_before == shed
        errors_before = sample(
            "orchestrator_errors_total", stage="inference", err_type="InferenceError"
        )
        worker.fail_with = RuntimeError("boom")
        worker.gate.set()
    after = sample("orchestrator_errors_total", stage="inference", err_type="InferenceError")
    assert after - errors_before == 10 - shed


async def test_queue_depth_shows_waiting_requests() -> None:
    worker = GateWorker()
    async with spawn_pipeline(worker, PipelineConfig(max_concurrency=1)) as handles:
        base = sample("orchestrator_queue_depth", stage="inference")
        await handles.submit(PromptRequest("s", "running"))
        await worker.wait_started(1)
        for i in range(3):
            await handles.submit(PromptRequest("s", f"q{i}"))
        await anyio.wait_all_tasks_blocked()
        assert sample("orchestrator_queue_depth", stage="inference") - base == 3
        worker.gate.set()
    assert sample("orchestrator_queue_depth", stage="inference") == base


def test_exposition_has_the_seed_names() -> None:
    text = metrics.gather_metrics()
    for name in (
        "orchestrator_requests_total",
        "orchestrator_requests_shed_total",
        "orchestrator_stage_duration_seconds_bucket",
        "orchestrator_queue_depth",
    ):
        assert name in text


def test_histogram_buckets_are_cumulative() -> None:
    hist = metrics.Histogram("test_hist_seconds", "test", ("k",), buckets=(0.1, 1.0))
    cell = hist.labels("a")
    for value in (0.05, 0.5, 5.0):
        cell.observe(value)
    assert (
        metrics.REGISTRY.get_sample_value("test_hist_seconds_bucket", {"k": "a", "le": "0.1"}) == 1
    )
    assert (
        metrics.REGISTRY.get_sample_value("test_hist_seconds_bucket", {"k": "a", "le": "1.0"}) == 2
    )
    assert (
        metrics.REGISTRY.get_sample_value("test_hist_seconds_bucket", {"k": "a", "le": "+Inf"}) == 3
    )
    assert metrics.REGISTRY.get_sample_value("test_hist_seconds_sum", {"k": "a"}) == pytest.approx(
        5.55
    )
    with pytest.raises(ValueError, match="labels"):
        hist.labels("a", "b")


async def test_metrics_server_serves_the_registry() -> None:
    server, thread = metrics.start_metrics_server(0, addr="127.0.0.1")
    try:
        port = server.server_address[1]
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/metrics")
        assert response.status_code == 200
        assert "orchestrator_requests_total" in response.text
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
