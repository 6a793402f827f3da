"""``ServerConfig``: where the server listens and the limits it enforces."""

from __future__ import annotations

import os
import urllib.parse
from typing import TYPE_CHECKING, Any

import attrs

from orchestrator._urls import redact_url

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["ServerConfig"]

MiB = 1024 * 1024


def _origins(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(o.strip() for o in value.split(",") if o.strip())
    return tuple(value)


def _positive(_inst: Any, attr: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attr.name} must be > 0, got {value!r}")


_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _redis_url(_inst: Any, _attr: attrs.Attribute[Any], value: str | None) -> None:
    if value is None:
        return
    if not value.startswith(_REDIS_SCHEMES):
        raise ValueError(
            "the Redis URL (REDIS_URL) must look like redis://host:6379/0 (or rediss://, "
            f"unix://), got {redact_url(value)!r}"
        )
    if not _splits(value):
        # Checked here, not when the server starts: redis-py's error would be a traceback
        # from the startup, quoting what it took for the port (a piece of the password).
        raise ValueError(
            "the Redis URL (REDIS_URL) is malformed: the port must be a number up to 65535, "
            "an IPv6 host in [brackets], and a '/', '?' or '#' in the password "
            f"percent-encoded; got {redact_url(value)!r}"
        )


def _splits(url: str) -> bool:
    """Whether ``url`` splits as redis-py reads it (``urllib.parse``): a numeric port, and
    no ``@`` past the host (a password holding ``/``, ``?`` or ``#`` ends it early)."""
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port
    except ValueError:
        return False
    return "@" not in parts.path + parts.query + parts.fragment


def default_max_connections() -> int:
    """Open connections the server allows by default: what the process's descriptor limit
    leaves after a margin for Redis, upstream workers and files."""
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 1000
    if soft == resource.RLIM_INFINITY:
        return 100_000
    return max(16, soft - 128)


@attrs.frozen(kw_only=True)
class ServerConfig:
    """Where the server listens and what it accepts.

    Example:
        >>> ServerConfig(port=9000).max_request_size
        10485760

    Attributes:
        host: Interface to bind.
        port: TCP port.
        max_request_size: Largest request body in bytes (413 beyond it).
        max_ws_message_size: Largest WebSocket message in bytes.
        timeout_seconds: Longest wait of ``GET /api/v1/result/{id}``, the requests'
            deadline, and the largest ``timeout`` a body may ask for.
        cors_origins: Allowed origins (``("*",)``: any, as the seed did).
        redis_url: Share the pipeline over this Redis: request records, the work queue
            and token streams, the response cache and the rate limits (see
            docs/scale-out.md).
        role: With ``redis_url``: ``"both"`` (admit and run requests: what identical
            replicas run) or ``"frontend"`` (admit and answer; ``orchestrator-worker``
            processes run them).
        rate_limit_requests: Requests per window per session (``None``: no limit).
        rate_limit_window: The window in seconds.
        cache_entries: Entries of the in-memory response cache (0: no cache).
        cache_ttl: Seconds a cached response lives.
        dedup: Identical prompts in flight share one worker call.
        worker: Which worker the standalone server builds: echo, openai, anthropic,
            llama_cpp or vllm.
        ws_send_timeout: Seconds a WebSocket client may take to accept a frame before it
            is disconnected (a slow client never blocks the pipeline).
        access_log: Log one structured line per HTTP request.
        drain_seconds: On SIGTERM/SIGINT, how long requests in flight may take to finish.
        header_timeout: Seconds a connection may take to send a request's head (request
            line and headers); then it is answered 408 and closed (slow or silent clients).
        keep_alive_timeout: Seconds an idle keep-alive connection stays open.
        max_connections: Open connections at most; one more is answered 503 and closed
            (``None``: the process's descriptor limit less a margin).
    """

    host: str = "0.0.0.0"
    port: int = attrs.field(
        default=8080,
        validator=attrs.validators.and_(attrs.validators.ge(0), attrs.validators.le(65535)),
    )
    max_request_size: int = attrs.field(default=10 * MiB, validator=_positive)
    max_ws_message_size: int = attrs.field(default=1 * MiB, validator=_positive)
    timeout_seconds: float = attrs.field(default=300.0, validator=_positive)
    cors_origins: tuple[str, ...] = attrs.field(default=("*",), converter=_origins)
    redis_url: str | None = attrs.field(
        default=None, validator=_redis_url, repr=lambda url: repr(url and redact_url(url))
    )
    rate_limit_requests: int | None = attrs.field(default=None, validator=_positive)
    rate_limit_window: float = attrs.field(default=60.0, validator=_positive)
    cache_entries: int = attrs.field(default=10_000, validator=attrs.validators.ge(0))
    cache_ttl: float = attrs.field(default=3600.0, validator=_positive)
    dedup: bool = True
    worker: str = "echo"
    role: str = attrs.field(default="both", validator=attrs.validators.in_(("both", "frontend")))
    ws_send_timeout: float = attrs.field(default=10.0, validator=_positive)
    access_log: bool = True
    drain_seconds: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    header_timeout: float = attrs.field(default=10.0, validator=_positive)
    keep_alive_timeout: float = attrs.field(default=5.0, validator=_positive)
    max_connections: int | None = attrs.field(default=None, validator=_positive)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ServerConfig:
        """Defaults, then the environment, then ``overrides``.

        Reads ``SERVER_HOST``, ``SERVER_PORT``, ``REDIS_URL``, ``RATE_LIMIT_REQUESTS``,
        ``RATE_LIMIT_WINDOW``, ``CORS_ORIGINS`` (comma separated), ``ORCHESTRATOR_WORKER``,
        ``ORCHESTRATOR_ROLE``.

        Raises:
            ValueError: A variable holds something unusable (the message names it).
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        readers: dict[str, tuple[str, Any]] = {
            "SERVER_HOST": ("host", str),
            "SERVER_PORT": ("port", int),
            "REDIS_URL": ("redis_url", str),
            "RATE_LIMIT_REQUESTS": ("rate_limit_requests", int),
            "RATE_LIMIT_WINDOW": ("rate_limit_window", float),
            "CORS_ORIGINS": ("cors_origins", str),
            "ORCHESTRATOR_WORKER": ("worker", str),
            "ORCHESTRATOR_ROLE": ("role", str),
        }
        for variable, (field, parse) in readers.items():
            raw = env.get(variable)
            if raw is None or raw == "":
                continue
            try:
                values[field] = parse(raw)
            except ValueError:
                raise ValueError(f"{variable}={raw!r} is not a valid {parse.__name__}") from None
        values.update(overrides)
        return cls(**values)
