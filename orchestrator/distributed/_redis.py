"""Redis commands of the distributed mode, with their failures translated. Private."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orchestrator.errors import BackendUnavailable

if TYPE_CHECKING:
    from collections.abc import Awaitable

__all__ = ["backend_errors", "command"]


def backend_errors() -> tuple[type[BaseException], ...]:
    """What a failing Redis raises through redis-py."""
    from redis.exceptions import RedisError

    return (RedisError, OSError, TimeoutError)


_ERRORS: tuple[type[BaseException], ...] | None = None


async def command(awaitable: Awaitable[Any]) -> Any:
    """Await a Redis command (or pipeline).

    Raises:
        BackendUnavailable: Redis failed or did not answer in time (chained to redis-py's
            error).
    """
    global _ERRORS
    if _ERRORS is None:
        _ERRORS = backend_errors()
    try:
        return await awaitable
    except _ERRORS as exc:
        raise BackendUnavailable(
            f"Redis did not answer: {type(exc).__name__}: {exc}", backend="redis"
        ) from exc
