"""``PipelineConfig``: the sizes, deadlines, hooks and policies of one pipeline."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from orchestrator.hooks import (
    DEFAULT_TEMPLATE,
    OutputSink,
    PostProcessor,
    Retriever,
    Template,
    default_retriever,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from orchestrator.enhanced.cache import CacheLayer
    from orchestrator.enhanced.circuit_breaker import CircuitBreaker
    from orchestrator.enhanced.dedup import Deduplicator
    from orchestrator.enhanced.rate_limit import RateLimiter
    from orchestrator.enhanced.retry import RetryPolicy

__all__ = ["PipelineConfig"]

_pos_int = attrs.validators.and_(attrs.validators.instance_of(int), attrs.validators.ge(1))
_pos_float = attrs.validators.gt(0.0)


def _check_template(_inst: Any, _attr: Any, value: Template) -> None:
    if isinstance(value, str):
        try:
            value.format(context="", input="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"template must be a format string using only {{context}} and {{input}}: {exc}"
            ) from exc
    elif not callable(value):
        raise TypeError(f"template must be a str or a callable, got {type(value).__name__}")


def _processors(value: Iterable[PostProcessor]) -> tuple[PostProcessor, ...]:
    return tuple(value)


def _sinks(value: Iterable[OutputSink]) -> tuple[OutputSink, ...]:
    return tuple(value)


@attrs.frozen(kw_only=True)
class PipelineConfig:
    """Sizes, deadlines, hooks and policies of one pipeline.

    Each ``*_capacity`` bounds the channel that feeds that stage (the seed's sizes); a full
    RAG channel makes ``submit`` raise ``Overloaded``. ``max_concurrency`` bounds the worker
    calls in flight; ``stage_concurrency`` the async hook calls in flight per stage.

    A finished request stays readable (``get``, the server's status and result routes)
    for ``retention_seconds``, among the last ``retention_max`` finished, while all of
    them together hold at most about ``retention_bytes`` (input, result and tokens; the
    oldest leave first). A finished record keeps only its input, result or error, and its
    tokens: the context and the assembled prompt are dropped. ``clock`` (monotonic
    seconds, ``time.monotonic`` by default) measures retention's ages; tests pass a fake
    one.

    ``retriever`` and ``template`` default to the seed's demo (a placeholder context line,
    ``"{context}\n\nUser Query: {input}\n\nAssistant:"``); for a real model pass
    ``retriever=None`` (no context) and ``template="{input}"`` (the prompt as is), or
    your own.

    Policies (all off by default): ``rate_limiter`` makes ``submit`` raise ``RateLimited``
    for a session over its budget; ``cache`` answers a repeated request at once and stores
    completed results for ``cache_ttl`` seconds (the key covers the input, the worker's
    identity, the template and the metadata except ``cache_ignore_meta``); ``dedup=True``
    (or a ``Deduplicator``) makes identical prompts in flight share one worker call;
    ``retry`` retries a failed worker call (a stream only before its first token);
    ``circuit_breaker`` fails calls fast while the worker keeps failing.

    Example:
        >>> PipelineConfig(max_concurrency=8, request_timeout=30).inference_capacity
        1024
    """

    rag_capacity: int = attrs.field(default=512, validator=_pos_int)
    assemble_capacity: int = attrs.field(default=512, validator=_pos_int)
    inference_capacity: int = attrs.field(default=1024, validator=_pos_int)
    post_capacity: int = attrs.field(default=512, validator=_pos_int)
    stream_capacity: int = attrs.field(default=256, validator=_pos_int)
    max_concurrency: int = attrs.field(default=64, validator=_pos_int)
    stage_concurrency: int = attrs.field(default=32, validator=_pos_int)
    request_timeout: float = attrs.field(default=300.0, validator=_pos_float, converter=float)
    drain_timeout: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    retention_seconds: float = attrs.field(default=300.0, validator=attrs.validators.ge(0))
    retention_max: int = attrs.field(default=10_000, validator=attrs.validators.ge(0))
    retention_bytes: int = attrs.field(default=128 * 1024 * 1024, validator=attrs.validators.ge(0))
    priority_aging: float | None = attrs.field(default=None)
    clock: Callable[[], float] | None = attrs.field(default=None)
    retriever: Retriever | None = attrs.field(default=default_retriever)
    template: Template = attrs.field(default=DEFAULT_TEMPLATE, validator=_check_template)
    post_processors: tuple[PostProcessor, ...] = attrs.field(default=(), converter=_processors)
    sinks: tuple[OutputSink, ...] = attrs.field(default=(), converter=_sinks)
    cache: CacheLayer | None = None
    cache_ttl: float | None = attrs.field(default=3600.0)
    cache_ignore_meta: frozenset[str] = attrs.field(
        default=frozenset({"priority"}), converter=frozenset
    )
    rate_limiter: RateLimiter | None = None
    dedup: bool | Deduplicator = False
    retry: RetryPolicy | None = None
    circuit_breaker: CircuitBreaker | None = None

    @cache_ttl.validator
    def _check_cache_ttl(self, _attr: Any, value: float | None) -> None:
        if value is not None and not value > 0:
            raise ValueError(f"cache_ttl must be > 0 seconds or None, got {value}")

    @priority_aging.validator
    def _check_aging(self, _attr: Any, value: float | None) -> None:
        if value is not None and not value > 0:
            raise ValueError(f"priority_aging must be > 0 seconds or None, got {value}")
