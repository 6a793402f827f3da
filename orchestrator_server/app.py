"""``create_app`` and ``start_server``: the library's objects behind Starlette routes."""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import time
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route, WebSocketRoute

from orchestrator import PipelineConfig, PipelineHandles, spawn_pipeline
from orchestrator.enhanced import CacheLayer, RateLimiter
from orchestrator_server import routes
from orchestrator_server.config import ServerConfig
from orchestrator_server.websocket import stream_endpoint
from orchestrator_server.workers import make_worker

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["ROUTES", "build_pipeline_config", "create_app", "start_server"]

access_logger = logging.getLogger("orchestrator_server.access")
logger = logging.getLogger("orchestrator_server")

ROUTES = [
    Route("/api/v1/infer", routes.infer, methods=["POST"]),
    Route("/api/v1/status/{request_id}", routes.status, methods=["GET"]),
    Route("/api/v1/result/{request_id}", routes.result, methods=["GET"]),
    WebSocketRoute("/api/v1/stream", stream_endpoint),
    Route("/health", routes.health, methods=["GET"]),
    Route("/metrics", routes.metrics_endpoint, methods=["GET"]),
]

_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


class _RequestIds:
    """Unique HTTP request ids without a syscall each: a random per-process prefix and a
    counter (they trace requests; they guard nothing, unlike pipeline request ids)."""

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._count = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}-{next(self._count):x}"


class EdgeMiddleware:
    """The one middleware in front of the routes.

    Gives every HTTP response an ``X-Request-ID`` (the client's, if sane), logs one
    structured access line per request, answers any escaped error as a JSON 500, and hands
    requests that carry an ``Origin`` header (browsers) to Starlette's ``CORSMiddleware``;
    others skip it (it cost more than our whole route), with ``Vary: Origin`` kept.
    """

    def __init__(
        self, app: ASGIApp, *, access_log: bool = True, cors_origins: tuple[str, ...] = ("*",)
    ) -> None:
        self.app = app
        self.access_log = access_log
        self.cors = CORSMiddleware(
            app,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=[
                "X-Request-ID",
                "Retry-After",
                "X-RateLimit-Limit",
                "X-RateLimit-Remaining",
                "X-RateLimit-Reset",
            ],
        )
        self._ids = _RequestIds()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ""
        inner = self.app
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _SANE_ID.fullmatch(candidate):
                    request_id = candidate
            elif name == b"origin":
                inner = self.cors
        request_id = request_id or self._ids.next()
        extra_headers = (
            (b"x-request-id", request_id.encode()),
            (b"vary", b"Origin"),
        )
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                if inner is self.cors:  # CORS adds its own Vary
                    message["headers"] = [*message.get("headers", ()), extra_headers[0]]
                else:
                    message["headers"] = [*message.get("headers", ()), *extra_headers]
            await send(message)

        try:
            await inner(scope, receive, send_with_id)
        except Exception:
            logger.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if not response_started:
                await routes.error_response(500, "internal server error")(
                    scope, receive, send_with_id
                )
        finally:
            if self.access_log:
                client = scope.get("client")
                access_logger.info(
                    '%s "%s %s" %d %.2fms id=%s',
                    client[0] if client else "-",
                    scope["method"],
                    scope["path"],
                    status,
                    (time.perf_counter() - started) * 1000,
                    request_id,
                    extra={
                        "request_id": request_id,
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "duration_ms": (time.perf_counter() - started) * 1000,
                    },
                )


async def build_pipeline_config(config: ServerConfig, stack: AsyncExitStack) -> PipelineConfig:
    """The ``PipelineConfig`` a standalone server runs with: its policies from ``config``.

    With ``redis_url`` the response cache and the rate limiter live in Redis (shared by
    every replica); otherwise in this process. The server starts even while Redis is
    down, degraded (cache misses; rate limits fail open) until it answers: a Redis outage
    never fails requests, at boot or later. ``stack`` closes what this opens.
    """
    cache: CacheLayer | None = None
    limiter: RateLimiter | None = None
    limit, window = config.rate_limit_requests, config.rate_limit_window
    if config.redis_url:
        cache = await CacheLayer.new_redis(
            config.redis_url, default_ttl=config.cache_ttl, ping=False
        )
        stack.push_async_callback(cache.aclose)
        if limit is not None:
            limiter = await RateLimiter.new_redis(config.redis_url, limit, window, ping=False)
            stack.push_async_callback(limiter.aclose)
    else:
        if config.cache_entries:
            cache = CacheLayer.new_memory(config.cache_entries, default_ttl=config.cache_ttl)
        if limit is not None:
            limiter = RateLimiter(limit, window)
    return PipelineConfig(
        cache=cache,
        cache_ttl=config.cache_ttl,
        rate_limiter=limiter,
        dedup=config.dedup,
        request_timeout=config.timeout_seconds,
    )


def create_app(
    handles: PipelineHandles | None = None, config: ServerConfig | None = None
) -> Starlette:
    """The Starlette app serving ``handles``.

    Args:
        handles: A running pipeline to serve; it is borrowed (left open at exit). ``None``
            builds one in the lifespan from ``config`` (worker and policies) and shuts it
            down, draining requests in flight, when the server stops.
        config: Limits and settings; ``ServerConfig.from_env()`` when ``None``.

    Example:
        >>> app = create_app(config=ServerConfig(port=8080))  # then: uvicorn.run(app)
    """
    settings = config if config is not None else ServerConfig.from_env()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[routes.AppState]:
        async with AsyncExitStack() as stack:
            if handles is not None:
                served = handles
            else:
                worker = make_worker(settings.worker)
                aclose = getattr(worker, "aclose", None)
                if aclose is not None:
                    stack.push_async_callback(aclose)
                pipeline = await build_pipeline_config(settings, stack)
                served = spawn_pipeline(worker, pipeline)
                stack.push_async_callback(served.shutdown, settings.drain_seconds)
            yield {"handles": served, "config": settings}

    middleware = [
        Middleware(
            EdgeMiddleware, access_log=settings.access_log, cors_origins=settings.cors_origins
        ),
    ]
    return Starlette(
        routes=ROUTES,
        middleware=middleware,
        exception_handlers=routes.EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )


async def start_server(
    config: ServerConfig | None = None, handles: PipelineHandles | None = None
) -> None:
    """Serve the app with uvicorn until SIGINT/SIGTERM, then drain and return.

    Args:
        config: Where to listen and what to accept; ``ServerConfig.from_env()`` if ``None``.
        handles: A running pipeline to serve (borrowed), or ``None`` to build one.
    """
    import uvicorn

    settings = config if config is not None else ServerConfig.from_env()
    app = create_app(handles, settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            ws_max_size=4 * settings.max_ws_message_size,
            access_log=False,  # ours is structured and carries the request id
            timeout_graceful_shutdown=math.ceil(settings.drain_seconds),
            log_config=None,
        )
    )
    await server.serve()
