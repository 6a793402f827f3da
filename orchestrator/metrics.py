"""Prometheus metrics of every pipeline in this process, on a registry of their own.

Names follow the seed: ``orchestrator_requests_total{stage}``,
``orchestrator_requests_shed_total{stage}``, ``orchestrator_errors_total{stage,err_type}``,
``orchestrator_stage_duration_seconds{stage}``, ``orchestrator_queue_depth{stage}``, plus
cache, rate-limit, dedup, circuit-breaker and worker metrics.

Counters and histograms here are plain Python numbers updated on the event loop and read
when scraped: a ``prometheus_client`` child takes a lock on every update, which cost more
than the rest of a request's trip through the pipeline. Several pipelines in one process
add into the same series; tests read deltas with ``REGISTRY.get_sample_value``.

Example:
    >>> from orchestrator import metrics
    >>> "orchestrator_requests_total" in metrics.gather_metrics()
    True
"""

from __future__ import annotations

import bisect
import math
from typing import TYPE_CHECKING, Final, final

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from threading import Thread
    from wsgiref.simple_server import WSGIServer

__all__ = [
    "CACHE_ERRORS",
    "CACHE_HITS",
    "CACHE_MISSES",
    "CIRCUIT_STATE",
    "DEAD_LETTERS",
    "DEDUP_JOINS",
    "ERRORS",
    "LEASES",
    "QUEUE_DEPTH",
    "RATE_LIMIT_DECISIONS",
    "RECLAIMS",
    "REDELIVERIES",
    "REGISTRY",
    "REQUESTS",
    "RETRIES",
    "SHARED_QUEUE_DEPTH",
    "SHARED_QUEUE_PENDING",
    "SHED",
    "STAGES",
    "STAGE_DURATION",
    "WORKER_LATENCY",
    "WORKER_TOKENS",
    "Counter",
    "Gauge",
    "Histogram",
    "gather_metrics",
    "start_metrics_server",
]

STAGES: Final = ("rag", "assemble", "inference", "post", "stream")

REGISTRY: Final = CollectorRegistry(auto_describe=True)
"""The registry every orchestrator metric lives in (not prometheus_client's global one)."""

_LATENCY_BUCKETS: Final = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


@final
class CounterCell:
    """One labelled series of a ``Counter``; keep it and call ``inc`` on the hot path."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (>= 0)."""
        self.value += amount


@final
class HistogramCell:
    """One labelled series of a ``Histogram``."""

    __slots__ = ("bounds", "buckets", "count", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Record one observation."""
        self.buckets[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value


class _Family(Collector):
    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        REGISTRY.register(self)

    def describe(self) -> Iterable[Metric]:
        return []


@final
class Counter(_Family):
    """A labelled counter; ``labels(...)`` returns a cached ``CounterCell``.

    With ``plus=histogram``, each series also counts that histogram's observations of the
    same labels, so a stage records its duration and its request count in one update.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...] = (),
        *,
        plus: Histogram | None = None,
    ) -> None:
        self._cells: dict[tuple[str, ...], CounterCell] = {}
        self._plus = plus
        super().__init__(name, documentation, labelnames)

    def labels(self, *values: str) -> CounterCell:
        """The series for these label values (created on first use)."""
        cell = self._cells.get(values)
        if cell is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            cell = self._cells[values] = CounterCell()
        return cell

    def value(self, *values: str) -> float:
        """The current value of a series (0 if never touched)."""
        return self._snapshot().get(values, 0.0)

    def _snapshot(self) -> dict[tuple[str, ...], float]:
        values = {labels: cell.value for labels, cell in list(self._cells.items())}
        if self._plus is not None:
            for labels, count in self._plus.counts():
                values[labels] = values.get(labels, 0.0) + count
        return values

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in self._snapshot().items():
            family.add_metric(list(labels), value)
        yield family


@final
class Histogram(_Family):
    """A labelled histogram; ``labels(...)`` returns a cached ``HistogramCell``."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...] = (),
        buckets: tuple[float, ...] = _LATENCY_BUCKETS,
    ) -> None:
        self._bounds = tuple(sorted(buckets))
        self._cells: dict[tuple[str, ...], HistogramCell] = {}
        super().__init__(name, documentation, labelnames)

    def labels(self, *values: str) -> HistogramCell:
        """The series for these label values (created on first use)."""
        cell = self._cells.get(values)
        if cell is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            cell = self._cells[values] = HistogramCell(self._bounds)
        return cell

    def counts(self) -> list[tuple[tuple[str, ...], int]]:
        """``(labels, observation count)`` of every series."""
        return [(labels, cell.count) for labels, cell in list(self._cells.items())]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, cell in list(self._cells.items()):
            cumulative, running = [], 0
            for bound, n in zip((*cell.bounds, math.inf), cell.buckets, strict=True):
                running += n
                cumulative.append((_fmt(bound), float(running)))
            family.add_metric(list(labels), cumulative, cell.sum)
        yield family


def _fmt(bound: float) -> str:
    return "+Inf" if bound == math.inf else repr(float(bound))


@final
class Gauge(_Family):
    """A labelled gauge whose series are set directly or read from callbacks at scrape time."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> None:
        self._values: dict[tuple[str, ...], float] = {}
        self._sources: list[Callable[[], Iterable[tuple[tuple[str, ...], float]]]] = []
        super().__init__(name, documentation, labelnames)

    def set(self, labels: tuple[str, ...], value: float) -> None:
        """Set one series."""
        self._values[labels] = value

    def add_source(self, source: Callable[[], Iterable[tuple[tuple[str, ...], float]]]) -> None:
        """Add a callback yielding ``(labels, value)`` pairs, summed per series at scrape."""
        self._sources.append(source)

    def value(self, *labels: str) -> float:
        """The current value of a series, sources included."""
        return self._snapshot().get(labels, 0.0)

    def _snapshot(self) -> dict[tuple[str, ...], float]:
        values = dict(self._values)
        for source in self._sources:
            for labels, value in source():
                values[labels] = values.get(labels, 0.0) + value
        return values

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in self._snapshot().items():
            family.add_metric(list(labels), value)
        yield family


SHED: Final = Counter(
    "orchestrator_requests_shed_total",
    "Requests refused or displaced because a bounded channel was full, by stage.",
    ("stage",),
)
ERRORS: Final = Counter(
    "orchestrator_errors_total",
    "Requests that failed, by stage and error type.",
    ("stage", "err_type"),
)
STAGE_DURATION: Final = Histogram(
    "orchestrator_stage_duration_seconds", "Time spent processing in each stage.", ("stage",)
)
REQUESTS: Final = Counter(
    "orchestrator_requests_total",
    "Requests processed, by pipeline stage.",
    ("stage",),
    plus=STAGE_DURATION,
)
QUEUE_DEPTH: Final = Gauge(
    "orchestrator_queue_depth", "Requests waiting in the channel feeding each stage.", ("stage",)
)
CACHE_HITS: Final = Counter("orchestrator_cache_hits_total", "Response cache hits.", ("backend",))
CACHE_MISSES: Final = Counter(
    "orchestrator_cache_misses_total", "Response cache misses.", ("backend",)
)
CACHE_ERRORS: Final = Counter(
    "orchestrator_cache_errors_total",
    "Cache backend errors (each degraded to a miss or a skipped store).",
    ("backend",),
)
RATE_LIMIT_DECISIONS: Final = Counter(
    "orchestrator_rate_limit_decisions_total",
    "Rate limiter decisions: allowed or limited.",
    ("decision",),
)
DEDUP_JOINS: Final = Counter(
    "orchestrator_dedup_joins_total",
    "Requests that joined an identical request already in flight instead of calling the worker.",
)
RETRIES: Final = Counter(
    "orchestrator_retries_total", "Worker calls retried after a retryable error.", ("worker",)
)
CIRCUIT_STATE: Final = Gauge(
    "orchestrator_circuit_breaker_state",
    "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
    ("breaker",),
)
WORKER_LATENCY: Final = Histogram(
    "orchestrator_worker_latency_seconds",
    "Duration of each worker call, first byte to last token.",
    ("worker",),
)
WORKER_TOKENS: Final = Counter(
    "orchestrator_worker_tokens_total",
    "Worker tokens: kind=prompt and kind=completion as the provider reports them, "
    "kind=chunks the text pieces the pipeline received.",
    ("worker", "kind"),
)

SHARED_QUEUE_DEPTH: Final = Gauge(
    "orchestrator_shared_queue_depth",
    "Jobs waiting in the shared (Redis) queue, not yet taken by a worker, by priority "
    "(sampled from Redis every few seconds).",
    ("priority",),
)
SHARED_QUEUE_PENDING: Final = Gauge(
    "orchestrator_shared_queue_pending",
    "Jobs of the shared queue in a worker's hands (delivered, not acknowledged), by "
    "priority (sampled from Redis).",
    ("priority",),
)
LEASES: Final = Gauge("orchestrator_shared_leases", "Jobs of the shared queue this process holds.")
RECLAIMS: Final = Counter(
    "orchestrator_reclaims_total",
    "Jobs this process took over from a worker that stopped renewing them (a dead one).",
)
REDELIVERIES: Final = Counter(
    "orchestrator_redeliveries_total",
    "Jobs this process received again after an earlier delivery (at-least-once).",
)
DEAD_LETTERS: Final = Counter(
    "orchestrator_dead_letters_total",
    "Jobs set aside after too many deliveries (their requests failed).",
)

for _stage in STAGES:  # every series exists from the start, so rate() sees the first event
    STAGE_DURATION.labels(_stage)
    SHED.labels(_stage)


def gather_metrics() -> str:
    """Return every orchestrator metric in the Prometheus text exposition format."""
    return generate_latest(REGISTRY).decode()


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> tuple[WSGIServer, Thread]:
    """Serve ``/metrics`` for this registry on ``port`` from a daemon thread.

    Returns:
        The server and its thread; ``server.shutdown()`` stops it.
    """
    return start_http_server(port, addr=addr, registry=REGISTRY)
