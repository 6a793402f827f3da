"""Response cache: in process (cachetools) or shared by every replica (Redis).

``CacheLayer`` maps a key (see ``cache_key``) to the text a worker produced, each entry
with its own time to live. The memory backend is a bounded ``cachetools.LRUCache``: the
least recently used entry leaves first when it is full; an expired one is a miss. The
Redis backend lets Redis expire entries (``SET ... PX``) and shares them across replicas.

A cache is an optimisation, so a Redis outage never fails a caller: ``get`` answers a miss,
``set`` and ``delete`` are skipped, each counted in ``orchestrator_cache_errors_total``.
The outage starts at the first call that fails, or as soon as a call has waited a quarter
of ``command_timeout`` without an answer (a frozen or black-holed server accepts
connections and answers nothing). Then the calls waiting on Redis are released with the
degraded answer, all but that overdue call, which goes on waiting as the probe; after it,
one call per ``probe_interval`` probes, and only while no other probe is out. Every other
call degrades at once, so a caller waits at most a quarter of the timeout and only the
probe waits it out. The first call that succeeds ends the outage, and every call goes to
Redis again. One warning is logged when the outage starts and one info line when Redis
answers again. redis-py drops a failed connection and reconnects on next use, so the
cache recovers by itself.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import time
from typing import TYPE_CHECKING, Any, Final, ParamSpec, Protocol, TypeVar, final

import attrs
import cachetools

from orchestrator import metrics
from orchestrator.enhanced._redis import (
    DOWN,
    SUSPECT_FRACTION,
    Outage,
    RedisClientOwner,
    client_for,
)
from orchestrator.enhanced._redis_batch import Queued, batcher_for

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Awaitable, Callable
    from types import TracebackType
    from typing import Self

    from redis.asyncio import Redis

    from orchestrator.enhanced._redis import Down
    from orchestrator.metrics import CounterCell
    from orchestrator.types import PromptRequest

__all__ = ["CacheBackend", "CacheLayer", "CachePolicy", "CacheStats", "PendingGet", "cache_key"]

logger = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

_KEY_PREFIX: Final = "prompt:"
_PARTS_MARK: Final = b"\xff"  # never occurs in UTF-8, so it ends the prompt unambiguously


def cache_key(prompt: str, *parts: str) -> str:
    """Return the cache key of a prompt: ``"prompt:"`` and a SHA-256 hex digest.

    With the prompt alone this is the seed's key,
    ``"prompt:" + hashlib.sha256(prompt.encode()).hexdigest()``. ``parts`` (the worker's
    identity, a model name, metadata that changes the answer) are hashed after it, each
    with its length, so different parts never give the same key: ``("a", "bc")`` and
    ``("ab", "c")`` differ, and no prompt alone collides with a prompt plus parts.

    Args:
        prompt: The text sent to the worker.
        *parts: More strings the answer depends on.

    Returns:
        ``"prompt:"`` followed by 64 hex digits.

    Example:
        >>> cache_key("What is Rust?")[:15]
        'prompt:ab0952c6'
        >>> cache_key("Hi", "gpt-4o") != cache_key("Hi", "gpt-4o-mini")
        True
    """
    digest = hashlib.sha256(prompt.encode("utf-8", "surrogatepass"))
    if parts:
        digest.update(_PARTS_MARK)
        for part in parts:
            raw = part.encode("utf-8", "surrogatepass")
            digest.update(len(raw).to_bytes(8, "big"))
            digest.update(raw)
    return _KEY_PREFIX + digest.hexdigest()


class CacheBackend(Protocol):
    """Where a ``CacheLayer`` keeps its entries. A method that raises means "unavailable".

    ``name`` labels the cache metrics; ``set`` gets ``None`` for "no expiry"; ``entries()``
    counts live entries, or is ``None`` when that is not cheap to know.
    """

    @property
    def name(self) -> str: ...

    async def get(self, key: str) -> str | None: ...

    async def set(self, key: str, value: str, ttl_seconds: float | None) -> None: ...

    async def delete(self, key: str) -> None: ...

    def entries(self) -> int | None: ...

    async def aclose(self) -> None: ...


@attrs.frozen(kw_only=True)
class CacheStats:
    """A snapshot of one cache's counters since it was made, from ``CacheLayer.stats()``.

    Example:
        >>> CacheStats(backend="memory", hits=3, misses=1, errors=0, entries=2).hit_ratio
        0.75
    """

    backend: str
    hits: int
    misses: int
    errors: int
    entries: int | None

    @property
    def hit_ratio(self) -> float:
        """``hits / (hits + misses)``, 0.0 before any lookup."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


def _check_ttl(ttl: float | None) -> None:
    if ttl is not None and not (0 < ttl < math.inf):
        raise ValueError(f"a ttl must be > 0 and finite seconds, or None; got {ttl!r}")


@final
@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)  # validated once: counters are hot
class CacheLayer:
    """A response cache with per-entry TTLs over a ``CacheBackend``.

    Build one with ``new_memory`` or ``new_redis``. Keys are usually ``cache_key(...)``;
    values are text. Use it as an async context manager, or call ``aclose()``: it closes a
    Redis client the cache created (one passed in is borrowed and left open).

    Args:
        backend: Where entries live.
        default_ttl: Seconds an entry lives when ``set`` gets no ``ttl_seconds``
            (``None``: no expiry).
        probe_interval: While the backend is failing, seconds between calls that try it
            (one at a time; the others degrade at once).
        clock: Monotonic seconds, for ``probe_interval``.

    Example:
        >>> async def demo() -> None:
        ...     async with CacheLayer.new_memory(1000, default_ttl=3600) as cache:
        ...         key = cache_key("What is Rust?")
        ...         if await cache.get(key) is None:
        ...             await cache.set(key, "A systems programming language.")
        ...         assert await cache.get(key) == "A systems programming language."
    """

    _backend: CacheBackend
    default_ttl: float | None = attrs.field(default=None, kw_only=True)
    probe_interval: float = attrs.field(default=1.0, kw_only=True, validator=attrs.validators.ge(0))
    _clock: Callable[[], float] = attrs.field(default=time.monotonic, kw_only=True)
    _hit_cell: CounterCell = attrs.field(init=False)
    _miss_cell: CounterCell = attrs.field(init=False)
    _error_cell: CounterCell = attrs.field(init=False)
    _outage: Outage = attrs.field(init=False)
    _local: bool = attrs.field(init=False)  # the memory backend
    _direct: bool = attrs.field(init=False)  # open, local and up: call the backend directly
    _hits: int = attrs.field(default=0, init=False)
    _misses: int = attrs.field(default=0, init=False)
    _errors: int = attrs.field(default=0, init=False)
    _closed: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        _check_ttl(self.default_ttl)
        backend = self._backend
        name = backend.name
        # A remote call may hang until its timeout, so each one goes through the outage
        # (which releases the waiting calls when one fails, or, for Redis, when one has
        # waited too long); the memory backend is called directly while it works.
        suspect_after = backend.suspect_after if isinstance(backend, _RedisBackend) else None
        self._local = self._direct = isinstance(backend, _MemoryBackend)
        self._outage = Outage(
            f"cache backend {name}",
            "serving misses",
            self.probe_interval,
            self._clock,
            logger,
            suspect_after=suspect_after,
        )
        self._hit_cell = metrics.CACHE_HITS.labels(name)
        self._miss_cell = metrics.CACHE_MISSES.labels(name)
        self._error_cell = metrics.CACHE_ERRORS.labels(name)

    # -- constructors ------------------------------------------------------------------------

    @classmethod
    def new_memory(
        cls,
        max_entries: int,
        *,
        default_ttl: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> CacheLayer:
        """An in-process cache of at most ``max_entries`` entries (LRU eviction).

        Args:
            max_entries: The bound; the least recently used entry leaves to make room.
            default_ttl: Seconds an entry lives when ``set`` gets no ``ttl_seconds``.
            clock: Monotonic seconds; tests pass a fake one.

        Raises:
            ValueError: ``max_entries`` < 1 or a bad ``default_ttl``.
        """
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        return cls(_MemoryBackend(max_entries, clock), default_ttl=default_ttl, clock=clock)

    @classmethod
    async def new_redis(
        cls,
        url: str | None = None,
        *,
        prefix: str = "orchestrator:",
        client: Redis | None = None,
        default_ttl: float | None = None,
        connect_timeout: float = 1.0,
        command_timeout: float = 1.0,
        max_connections: int = 64,
        probe_interval: float = 1.0,
        ping: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> CacheLayer:
        """A cache in Redis, shared by every process that uses the same server and prefix.

        Args:
            url: ``redis://[user:password@]host:port/db`` (or ``rediss://``, ``unix://``).
            prefix: Prepended to every key, to share a server with other data.
            client: A ``redis.asyncio.Redis`` to borrow instead of ``url`` (such as one
                from ``connect_redis``, shared with a rate limiter): the cache never
                closes it. Give it ``decode_responses=False`` (the default) and short
                timeouts.
            default_ttl: Seconds an entry lives when ``set`` gets no ``ttl_seconds``.
            connect_timeout: Seconds to open a connection.
            command_timeout: Seconds for one command, and to wait for a free pooled
                connection. A call unanswered for a quarter of it starts an outage
                (with a borrowed client too, whatever its own timeouts).
            max_connections: Size of the connection pool the cache creates.
            probe_interval: While Redis is failing, seconds between calls that try it.
            ping: Check that the server answers before returning.
            clock: Monotonic seconds, for ``probe_interval`` (the quarter of
                ``command_timeout`` is timed on the event loop's clock, like the timeout).

        Raises:
            ValueError: Neither or both of ``url`` and ``client``, or a bad URL or value.
            BackendUnavailable: ``ping`` is true and the server did not answer.
        """
        client, owned = await client_for(
            url,
            client,
            connect_timeout=connect_timeout,
            command_timeout=command_timeout,
            max_connections=max_connections,
            ping=ping,
        )
        backend = _RedisBackend(
            client, prefix, owned=owned, suspect_after=command_timeout * SUSPECT_FRACTION
        )
        return cls(backend, default_ttl=default_ttl, probe_interval=probe_interval, clock=clock)

    # -- operations --------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """``"memory"`` or ``"redis"`` (the label of this cache's metrics)."""
        return self._backend.name

    async def get(self, key: str) -> str | None:
        """Return the value stored under ``key``, or ``None`` (a miss, or the backend is down).

        Raises:
            RuntimeError: The cache is closed.
        """
        if self._direct:  # the memory backend, open and answering: nothing to watch
            try:
                value = await self._backend.get(key)
            except Exception as exc:
                self._failed(exc)
                return None
        else:
            answer = await self._guarded(self._backend.get, key)
            if answer is DOWN:
                return None
            value = answer
        return self._counted(value)

    def get_soon(self, key: str) -> PendingGet:
        """``get(key)`` in two steps: on Redis its command is queued now, so that the next
        command sent to the same client (a Redis rate-limit check) carries it in the same
        round trip; ``await pending.answer()`` awaits the answer, and ``pending.discard()``
        says nobody will (a command not sent yet is then never sent).

        Raises:
            RuntimeError: The cache is closed (here, or when the answer is awaited).
        """
        backend = self._backend
        if self._closed:
            raise RuntimeError("the cache is closed")
        if not isinstance(backend, _RedisBackend) or self._outage.down:
            return PendingGet(self, key, None)
        return PendingGet(self, key, backend.enqueue_get(key))

    async def _answer_of(self, queued: Queued) -> str | None:
        answer = await self._guarded(queued.reply)
        if answer is DOWN:
            queued.discard()
            return None
        return self._counted(_RedisBackend.decode(answer))

    def _counted(self, value: str | None) -> str | None:
        if value is None:
            self._misses += 1
            self._miss_cell.inc()
        else:
            self._hits += 1
            self._hit_cell.inc()
        return value

    async def set(self, key: str, value: str, ttl_seconds: float | None = None) -> None:
        """Store ``value`` under ``key``; skipped (and counted) while the backend is down.

        Args:
            key: The key, usually from ``cache_key``.
            value: The text to store; it comes back exactly (any Unicode, or ``""``).
            ttl_seconds: Seconds the entry lives; ``None`` uses ``default_ttl`` (itself
                ``None`` by default: no expiry).

        Raises:
            ValueError: ``ttl_seconds`` is not > 0 and finite.
            RuntimeError: The cache is closed.
        """
        _check_ttl(ttl_seconds)
        ttl = self.default_ttl if ttl_seconds is None else ttl_seconds
        if not self._direct:
            await self._guarded(self._backend.set, key, value, ttl)
            return
        try:
            await self._backend.set(key, value, ttl)
        except Exception as exc:
            self._failed(exc)

    def set_nowait(self, key: str, value: str, ttl_seconds: float | None = None) -> bool:
        """``set`` without awaiting, when that can be done.

        In memory it stores at once. On Redis it queues the store behind the batch of
        commands in flight to the same client (see docs/cache.md): it is sent with the
        next batch, before any command this process queues after it, so a lookup from
        here that follows finds it; its failure is counted as ``set``'s would be. The
        pipeline stores each result this way when it can: no task, no loop turn.

        Returns:
            ``True`` if stored (or queued); ``False``, nothing done, when it needs
            ``await set(...)``: on Redis with no batch in flight, or during an outage.

        Raises:
            ValueError: ``ttl_seconds`` is not > 0 and finite.
            RuntimeError: The cache is closed.
        """
        backend = self._backend
        _check_ttl(ttl_seconds)
        if self._closed:
            raise RuntimeError("the cache is closed")
        ttl = self.default_ttl if ttl_seconds is None else ttl_seconds
        if isinstance(backend, _MemoryBackend):
            backend.store(key, value, ttl)
            return True
        if self._outage.down or not isinstance(backend, _RedisBackend):
            return False
        reply = backend.store_behind(key, value, ttl)
        if reply is None:
            return False
        reply.add_done_callback(self._stored_behind)
        return True

    def _stored_behind(self, reply: asyncio.Future[Any]) -> None:
        exc = None if reply.cancelled() else reply.exception()
        if isinstance(exc, Exception):
            self._failed(exc)

    async def delete(self, key: str) -> None:
        """Remove ``key`` if present; skipped (and counted) while the backend is down.

        Raises:
            RuntimeError: The cache is closed.
        """
        if not self._direct:
            await self._guarded(self._backend.delete, key)
            return
        try:
            await self._backend.delete(key)
        except Exception as exc:
            self._failed(exc)

    def stats(self) -> CacheStats:
        """This cache's hits, misses and errors so far, and its live entries when known."""
        return CacheStats(
            backend=self._backend.name,
            hits=self._hits,
            misses=self._misses,
            errors=self._errors,
            entries=self._backend.entries(),
        )

    @property
    def available(self) -> bool:
        """False from the start of an outage until the next call that succeeds."""
        return not self._outage.down

    async def aclose(self) -> None:
        """Close what the cache owns (idempotent)."""
        if not self._closed:
            self._closed = True
            self._direct = False
            await self._backend.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- outage bookkeeping ------------------------------------------------------------------

    async def _guarded(
        self, op: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T | Down:
        # Every call while closed or down, and every call to a remote backend; the memory
        # backend goes back to the direct path once a call succeeds.
        if self._closed:
            raise RuntimeError("the cache is closed")
        answer = await self._outage.call(op, *args, **kwargs)
        if answer is DOWN:
            self._errors += 1
            self._error_cell.inc()
        self._direct = self._local and not self._closed and not self._outage.down
        return answer

    def _failed(self, exc: Exception) -> None:
        self._errors += 1
        self._error_cell.inc()
        self._outage.failed(exc)
        self._direct = False


@final
class PendingGet:
    """A lookup begun by ``CacheLayer.get_soon``: ``await answer()``, or ``discard()``."""

    __slots__ = ("_cache", "_key", "_queued")

    def __init__(self, cache: CacheLayer, key: str, queued: Queued | None) -> None:
        self._cache = cache
        self._key = key
        self._queued = queued

    async def answer(self) -> str | None:
        """What ``get(key)`` answers."""
        queued = self._queued
        if queued is None:
            return await self._cache.get(self._key)
        return await self._cache._answer_of(queued)  # noqa: SLF001  # one module's

    def discard(self) -> None:
        """Nobody will read the answer: its command, if not sent yet, never is."""
        if self._queued is not None:
            self._queued.discard()


@final
class _MemoryBackend:
    """A ``cachetools.LRUCache`` of ``(value, expires_at)``: bounded, LRU eviction, an
    expiry time per entry, checked when the entry is read.

    An expired entry stays until it is read (a miss), counted by ``entries()``, or evicted
    in LRU order. A store costs a fifth of ``TLRUCache``'s, whose expiry heap made it
    cost more than the request's trip through the pipeline.
    """

    __slots__ = ("_clock", "_entries")

    name: Final = "memory"

    def __init__(self, max_entries: int, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._entries: cachetools.LRUCache[str, tuple[str, float]] = cachetools.LRUCache(
            maxsize=max_entries
        )

    async def get(self, key: str) -> str | None:
        entry = self._entries.get(key)  # a hit becomes the most recently used
        if entry is None:
            return None
        value, expires = entry
        if expires <= self._clock():
            self._entries.pop(key, None)
            return None
        return value

    async def set(self, key: str, value: str, ttl_seconds: float | None) -> None:
        self.store(key, value, ttl_seconds)

    def store(self, key: str, value: str, ttl_seconds: float | None) -> None:
        expires = math.inf if ttl_seconds is None else self._clock() + ttl_seconds
        self._entries[key] = (value, expires)

    async def delete(self, key: str) -> None:
        self._entries.pop(key, None)

    def entries(self) -> int:
        now = self._clock()
        entries = self._entries
        for key in [key for key, (_, expires) in entries.items() if expires <= now]:
            del entries[key]
        return len(entries)

    async def aclose(self) -> None:
        self._entries.clear()


@final
class _RedisBackend(RedisClientOwner):
    """Entries as Redis strings under ``prefix + key``, expired by Redis (``PX``)."""

    __slots__ = ("_batch", "_client", "_closed", "_owned", "_prefix", "suspect_after")

    name: Final = "redis"
    _unclosed_warning = (
        "CacheLayer on Redis was not closed: use `async with` or `await cache.aclose()`"
    )

    def __init__(self, client: Redis, prefix: str, *, owned: bool, suspect_after: float) -> None:
        self._client = client
        self._batch = batcher_for(client)  # commands of concurrent calls: one round trip
        self._prefix = prefix
        self._owned = owned
        self._closed = False
        self.suspect_after = suspect_after  # read by the cache's Outage

    async def get(self, key: str) -> str | None:
        return self.decode(await self._batch.execute("GET", self._prefix + key))

    def enqueue_get(self, key: str) -> Queued:
        """``get``'s command, queued now; ``decode(await queued.reply())`` later."""
        return self._batch.enqueue("GET", self._prefix + key)

    @staticmethod
    def decode(raw: bytes | str | None) -> str | None:
        if raw is None or isinstance(raw, str):  # a borrowed client may decode for us
            return raw
        return raw.decode("utf-8", "surrogatepass")

    def store_behind(
        self, key: str, value: str, ttl_seconds: float | None
    ) -> asyncio.Future[Any] | None:
        """``set`` queued behind the batch in flight, or ``None`` when there is none."""
        return self._batch.send_detached(*self._set_command(key, value, ttl_seconds))

    def _set_command(self, key: str, value: str, ttl_seconds: float | None) -> tuple[Any, ...]:
        data = value.encode("utf-8", "surrogatepass")
        if ttl_seconds is None:
            return ("SET", self._prefix + key, data)
        return ("SET", self._prefix + key, data, "PX", max(1, round(ttl_seconds * 1000)))

    async def set(self, key: str, value: str, ttl_seconds: float | None) -> None:
        await self._batch.execute(*self._set_command(key, value, ttl_seconds))

    async def delete(self, key: str) -> None:
        await self._batch.execute("DEL", self._prefix + key)

    def entries(self) -> None:
        return None  # counting our keys means a SCAN of the whole keyspace


@final
class CachePolicy:
    """What a pipeline asks of its response cache, in one place: the key of a request, the
    lookup at admission, the store when the request completes.

    The key covers the request's input, the cache's ``scope`` (what besides the input
    changes the answers: the worker's identity and the prompt template) and the request's
    metadata except the keys in ``ignore_meta`` (``priority`` by default: it changes when
    an answer comes, not what it says).

    Args:
        cache: Where entries live.
        scope: See above; ``CachePolicy.scope_of(worker, template)`` computes it.
        ttl: Seconds a stored answer lives (``None``: the cache's default).
        ignore_meta: Metadata keys left out of the key.

    Example:
        >>> policy = CachePolicy(CacheLayer.new_memory(100), scope="echo|{input}")
        >>> from orchestrator.types import PromptRequest
        >>> policy.key(PromptRequest("u1", "Hi", meta={"priority": "high"})) == policy.key(
        ...     PromptRequest("u2", "Hi")
        ... )
        True
    """

    __slots__ = ("_ignore", "cache", "scope", "ttl")

    def __init__(
        self,
        cache: CacheLayer,
        *,
        scope: str,
        ttl: float | None = None,
        ignore_meta: frozenset[str] = frozenset({"priority"}),
    ) -> None:
        _check_ttl(ttl)
        self.cache = cache
        self.scope = scope
        self.ttl = ttl
        self._ignore = ignore_meta

    @staticmethod
    def scope_of(worker: object, template: object) -> str:
        """The scope of a worker and a prompt template: the worker's ``cache_identity``
        (or its class's qualified name) and the template's text (or callable's name)."""
        identity = getattr(worker, "cache_identity", None)
        if not isinstance(identity, str):
            identity = f"{type(worker).__module__}.{type(worker).__qualname__}"
        shape = template if isinstance(template, str) else getattr(template, "__qualname__", "")
        return f"{identity}|{shape}"

    def key(self, request: PromptRequest) -> str:
        """The cache key of ``request``."""
        meta = request.meta
        if meta:
            ignored = self._ignore
            kept = sorted((k, v) for k, v in meta.items() if k not in ignored)
            if kept:  # each key and value a part of its own: {"a": "b=c"} != {"a=b": "c"}
                return cache_key(request.input, self.scope, *itertools.chain(*kept))
        return cache_key(request.input, self.scope)

    def lookup_soon(self, request: PromptRequest) -> tuple[str, PendingGet]:
        """``lookup`` in two steps (see ``CacheLayer.get_soon``): the key, and the pending
        lookup of its stored answer."""
        key = self.key(request)
        return key, self.cache.get_soon(key)

    async def lookup(self, request: PromptRequest) -> tuple[str, str | None]:
        """``request``'s key and its stored answer (``None``: a miss, or the cache is
        down)."""
        key = self.key(request)
        return key, await self.cache.get(key)

    def store_nowait(self, key: str, text: str) -> bool:
        """Store without awaiting when the cache lives in this process; ``False`` (nothing
        done) when it needs ``await store(...)``."""
        return self.cache.set_nowait(key, text, self.ttl)

    async def store(self, key: str, text: str) -> None:
        """Store ``text`` under ``key`` (skipped while the backend is down)."""
        await self.cache.set(key, text, self.ttl)
