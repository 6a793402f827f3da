"""Redis plumbing shared by ``cache`` and ``rate_limit``.

``connect_redis`` makes (or borrows) the client, ``Outage`` keeps the books while the
server is failing, and ``RedisClientOwner`` closes a client the object created. redis-py
is imported on use: it is the optional ``redis`` extra.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, ClassVar, final

from orchestrator._urls import redact_url

if TYPE_CHECKING:
    import logging
    from collections.abc import Callable

    from redis.asyncio import Redis


@final
class Outage:
    """Outage bookkeeping of one Redis-backed object (a cache's or a rate limiter's).

    Logs one warning when failures start and one info line when a call succeeds again,
    and while down lets one call per ``probe_interval`` try the server (``skip()`` is
    true for the others, which take the degraded answer at once). ``log`` is the owner's
    module logger, so the lines carry the name of the module a user configures.
    """

    __slots__ = (
        "_clock",
        "_degraded",
        "_log",
        "_next_probe",
        "_what",
        "down_since",
        "probe_interval",
    )

    def __init__(
        self,
        what: str,
        probe_interval: float,
        clock: Callable[[], float],
        log: logging.Logger,
    ) -> None:
        self._what = what
        self._log = log
        self.probe_interval = probe_interval
        self._clock = clock
        self.down_since: float | None = None
        self._next_probe = 0.0
        self._degraded = 0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def skip(self) -> bool:
        if self.down_since is None or self._clock() >= self._next_probe:
            return False
        self._degraded += 1
        return True

    def failed(self, exc: Exception, consequence: str) -> None:
        now = self._clock()
        self._next_probe = now + self.probe_interval
        self._degraded += 1
        if self.down_since is None:
            self.down_since = now
            self._log.warning(
                "%s is unavailable, %s until it answers: %s: %s",
                self._what,
                consequence,
                type(exc).__name__,
                exc,
            )

    def succeeded(self) -> None:
        if self.down_since is not None:
            self._log.info(
                "%s answers again after %.1fs (%d calls degraded)",
                self._what,
                self._clock() - self.down_since,
                self._degraded,
            )
            self.down_since = None
            self._degraded = 0


async def connect_redis(
    url: str | None,
    client: Redis | None,
    *,
    connect_timeout: float,
    command_timeout: float,
    max_connections: int,
    ping: bool,
) -> tuple[Redis, bool]:
    """The client to use and whether we own it.

    Raises:
        ValueError: Neither or both of ``url`` and ``client``, or a bad URL.
        ConnectionError: ``ping`` is true and the server did not answer.
        ImportError: redis-py is not installed (the ``redis`` extra).
    """
    try:
        import redis  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "the Redis backends need redis-py: pip install 'prompt-orchestrator[redis]'"
        ) from exc
    from redis.asyncio import BlockingConnectionPool
    from redis.asyncio import Redis as _Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisError

    if (url is None) == (client is None):
        raise ValueError("pass exactly one of url or client")
    owned = client is None
    if client is None:
        assert url is not None
        # One immediate retry: after a server restart the first command on a pooled
        # connection meets the dead socket, and the retry reconnects. More retries (or
        # redis-py's default backoff) would only stretch an outage into every call.
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=command_timeout,
            socket_connect_timeout=connect_timeout,
            socket_timeout=command_timeout,
            retry=Retry(NoBackoff(), 1),
        )
        client = _Redis.from_pool(pool)
    if ping:
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            if owned:
                await client.aclose()
            where = redact_url(url) if url is not None else "the given client"
            raise ConnectionError(f"Redis at {where} did not answer PING: {exc}") from exc
    return client, owned


class RedisClientOwner:
    """Base of a backend holding a client from ``connect_redis``: closes it if owned.

    A subclass sets ``_client``, ``_owned`` and ``_closed = False`` in ``__init__`` and
    says in ``_unclosed_warning`` how to close it; an owned client never closed warns
    ``ResourceWarning`` when the backend is collected.
    """

    __slots__ = ()

    _client: Redis
    _owned: bool
    _closed: bool
    _unclosed_warning: ClassVar[str]

    async def aclose(self) -> None:
        if not self._closed:
            # mypy checks against this class's empty __slots__; each subclass holds _closed.
            self._closed = True  # type: ignore[misc]
            if self._owned:
                await self._client.aclose()

    def __del__(self) -> None:
        if self._owned and not getattr(self, "_closed", True):
            warnings.warn(
                self._unclosed_warning,
                ResourceWarning,
                source=self,
                stacklevel=1,
            )
