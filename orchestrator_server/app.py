"""``create_app`` and ``start_server``: the library's objects behind Starlette routes."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import signal
import threading
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Final

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route, WebSocketRoute

from orchestrator import BackendUnavailable, PipelineConfig, PipelineHandles, spawn_pipeline
from orchestrator._urls import redact_url
from orchestrator.distributed import ClusterConfig
from orchestrator.enhanced import CacheLayer, RateLimiter, connect_redis
from orchestrator.hooks import DEFAULT_TEMPLATE, default_retriever
from orchestrator_server import routes
from orchestrator_server._drain import GRACE, Drain
from orchestrator_server._loop import run
from orchestrator_server._middleware import EdgeMiddleware
from orchestrator_server._protocol import edge_protocol
from orchestrator_server.config import ServerConfig, default_max_connections
from orchestrator_server.websocket import stream_endpoint
from orchestrator_server.workers import make_worker

if TYPE_CHECKING:
    import socket
    from collections.abc import AsyncIterator
    from types import FrameType

    from starlette.types import ASGIApp, Scope


__all__ = [
    "ROUTES",
    "build_pipeline_config",
    "build_server",
    "create_app",
    "describe",
    "run_server",
    "start_server",
]

logger = logging.getLogger("orchestrator_server")

_REDIS_CONNECTIONS = 64
"""The pool size ``CacheLayer.new_redis`` and ``RateLimiter.new_redis`` give themselves."""

ROUTES = [
    Route("/api/v1/infer", routes.infer, methods=["POST"]),
    Route("/api/v1/status/{request_id}", routes.status, methods=["GET"]),
    Route("/api/v1/result/{request_id}", routes.result, methods=["GET"]),
    Route("/api/v1/requests/{request_id}", routes.cancel, methods=["DELETE"]),
    Route("/api/v1/tokens/{request_id}", routes.follow_tokens, methods=["GET"]),
    WebSocketRoute("/api/v1/stream", stream_endpoint),
    Route("/health", routes.health, methods=["GET"]),
    Route("/metrics", routes.metrics_endpoint, methods=["GET"]),
]


_RESULT: Final = "/api/v1/result/"
_STATUS: Final = "/api/v1/status/"


def _hot_route(scope: Scope) -> ASGIApp | None:
    """The raw route of the requests a client makes once per prompt, as ``ROUTES`` would
    match it (its ``path_params`` set), or ``None`` for Starlette's router to match."""
    path: str = scope["path"]
    if path == "/api/v1/infer":
        return routes.infer.endpoint if scope["method"] == "POST" else None
    for prefix, route in ((_RESULT, routes.result), (_STATUS, routes.status)):
        if path.startswith(prefix):
            request_id = path[len(prefix) :]
            if scope["method"] != "GET" or not request_id or "/" in request_id:
                return None
            scope["path_params"] = {"request_id": request_id}
            return route.endpoint
    return None


async def build_pipeline_config(config: ServerConfig, stack: AsyncExitStack) -> PipelineConfig:
    """The ``PipelineConfig`` a standalone server runs with: its policies from ``config``.

    With ``redis_url`` the response cache and the rate limiter live in Redis (shared by
    every replica), over one client (one connection pool) that both borrow; otherwise in
    this process. The server starts even while Redis is down, degraded (cache misses;
    rate limits fail open) until it answers, and says so at once, in one warning: a Redis
    outage never fails requests, at boot or later. ``stack`` closes what this opens.

    The echo worker gets the seed's demo prompt (a placeholder context line and template);
    any other worker gets the user's prompt as is, since the server configures no
    retriever or template of its own.
    """
    cache: CacheLayer | None = None
    limiter: RateLimiter | None = None
    limit, window = config.rate_limit_requests, config.rate_limit_window
    if config.redis_url:
        # The pool serves a cache lookup, a cache store and a rate-limit check per request:
        # as many connections as the two pools of their own would have had together.
        connections = 2 * _REDIS_CONNECTIONS
        try:
            client = await connect_redis(config.redis_url, max_connections=connections)
        except BackendUnavailable as exc:
            logger.warning(
                "%s; serving degraded (cache misses, rate limits allow) until it answers", exc
            )
            client = await connect_redis(config.redis_url, max_connections=connections, ping=False)
        stack.push_async_callback(client.aclose)  # after the borrowers below: LIFO
        cache = await CacheLayer.new_redis(client=client, default_ttl=config.cache_ttl, ping=False)
        stack.push_async_callback(cache.aclose)
        if limit is not None:
            limiter = await RateLimiter.new_redis(None, limit, window, client=client, ping=False)
            stack.push_async_callback(limiter.aclose)
    else:
        if config.cache_entries:
            cache = CacheLayer.new_memory(config.cache_entries, default_ttl=config.cache_ttl)
        if limit is not None:
            limiter = RateLimiter(limit, window)
    seed_demo = config.worker == "echo"
    return PipelineConfig(
        cache=cache,
        cache_ttl=config.cache_ttl,
        rate_limiter=limiter,
        dedup=config.dedup,
        request_timeout=config.timeout_seconds,
        retriever=default_retriever if seed_demo else None,
        template=DEFAULT_TEMPLATE if seed_demo else "{input}",
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
                served, drain = handles, Drain(settings.drain_seconds, None)
            else:
                worker = None
                if settings.role == "both" or settings.redis_url is None:
                    worker = make_worker(settings.worker)
                    aclose = getattr(worker, "aclose", None)
                    if aclose is not None:
                        stack.push_async_callback(aclose)
                pipeline = await build_pipeline_config(settings, stack)
                if settings.redis_url is None:
                    served = spawn_pipeline(worker, pipeline)
                else:  # shared: any replica answers for any request (docs/scale-out.md)
                    served = spawn_pipeline(
                        worker,
                        pipeline,
                        redis_url=settings.redis_url,
                        role="both" if settings.role == "both" else "frontend",
                        cluster=ClusterConfig.from_env(),
                    )
                drain = Drain(settings.drain_seconds, served.shutdown)
            app.state.drain = drain  # start_server begins it on SIGTERM
            await stack.enter_async_context(drain.running())
            yield {"handles": served, "config": settings, "drain": drain}

    middleware = [
        Middleware(
            EdgeMiddleware,
            access_log=settings.access_log,
            cors_origins=settings.cors_origins,
            hot_route=_hot_route,
        ),
    ]
    return Starlette(
        routes=ROUTES,
        middleware=middleware,
        exception_handlers=routes.EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )


async def start_server(
    config: ServerConfig | None = None,
    handles: PipelineHandles | None = None,
    *,
    sockets: list[socket.socket] | None = None,
) -> None:
    """Serve the app with uvicorn until SIGINT/SIGTERM, then drain and return.

    The drain: admission stops at once, requests in flight get ``drain_seconds`` to
    finish, long-polls still waiting then get a JSON 503, and the pipeline stops. uvicorn's
    own graceful-shutdown timeout is set past that, so no handler is cut off.

    Before it serves, the objects alive so far (modules, classes, functions, the app) are
    frozen out of the cyclic garbage collector (``gc.freeze()``): they live as long as the
    process anyway, and each full collection traversing them was a pause of its own (p99 at
    one connection 33 ms before, 3-9 ms after; docs/benchmarks.md).

    Args:
        config: Where to listen and what to accept; ``ServerConfig.from_env()`` if ``None``.
        handles: A running pipeline to serve (borrowed), or ``None`` to build one.
        sockets: Listening sockets to serve instead of binding ``host:port`` (one shared
            by several server processes, say).
    """
    settings = config if config is not None else ServerConfig.from_env()
    server = build_server(create_app(handles, settings), settings)
    logger.info("%s", describe(settings, borrowed=handles is not None))
    gc.freeze()  # what lives now lives on: full collections need not traverse it
    await server.serve(sockets=sockets)


def build_server(app: Starlette, settings: ServerConfig) -> uvicorn.Server:
    """The uvicorn server ``start_server`` runs: the edge protocol (JSON for uvicorn's own
    errors, the header timeout, the connection limit), the keep-alive and graceful
    timeouts, and the drain begun as soon as it starts shutting down.

    Args:
        app: From ``create_app``.
        settings: The limits; ``host`` and ``port`` are where ``serve()`` listens
            (``serve(sockets=[...])`` takes sockets of your own instead).
    """
    max_connections = settings.max_connections or default_max_connections()
    return _DrainingServer(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            http=edge_protocol(
                header_timeout=settings.header_timeout, max_connections=max_connections
            ),
            ws_max_size=4 * settings.max_ws_message_size,
            access_log=False,  # ours is structured and carries the request id
            timeout_keep_alive=max(1, math.ceil(settings.keep_alive_timeout)),
            timeout_graceful_shutdown=math.ceil(settings.drain_seconds + GRACE) + 2,
            log_config=None,
        ),
        app,
    )


def run_server(
    config: ServerConfig | None = None, *, sockets: list[socket.socket] | None = None
) -> None:
    """Run the server in the foreground (on uvloop when installed) until SIGINT or SIGTERM,
    drain as ``start_server`` does, and return normally: a script that ends with it
    exits with status 0 after Ctrl-C or ``kill``.

    Args:
        config: Where to listen and what to accept; ``ServerConfig.from_env()`` if ``None``.
        sockets: Listening sockets to serve instead of binding ``host:port``.

    Example:
        >>> run_server(ServerConfig(port=8080))  # doctest: +SKIP
    """
    main = threading.current_thread() is threading.main_thread()
    previous = (
        {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
        if main
        else {}
    )
    try:
        with contextlib.suppress(KeyboardInterrupt):
            run(start_server(config, sockets=sockets))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # uvicorn handles the signal while it serves and raises it again once it has drained;
    # before and after that, SIGTERM stops the process the way Ctrl-C does, quietly.
    raise KeyboardInterrupt


def describe(config: ServerConfig, *, borrowed: bool = False) -> str:
    """The one line the server logs at start: where it listens and what it runs."""
    if borrowed:
        pipeline = "a pipeline passed in"
    else:
        limit = (
            f"{config.rate_limit_requests} per {config.rate_limit_window:g}s"
            if config.rate_limit_requests is not None
            else "off"
        )
        cache = (
            "redis"
            if config.redis_url
            else (f"memory, {config.cache_entries} entries" if config.cache_entries else "off")
        )
        pipeline = (
            f"worker {config.worker}, cache {cache}, rate limit {limit}, "
            f"dedup {'on' if config.dedup else 'off'}"
        )
    redis = redact_url(config.redis_url) if config.redis_url else "none"
    return (
        f"serving on http://{config.host}:{config.port} ({pipeline}; redis {redis}; "
        f"timeout {config.timeout_seconds:g}s, drain {config.drain_seconds:g}s, "
        f"max connections {config.max_connections or default_max_connections()})"
    )


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, beginning the app's drain the moment it starts shutting down, so
    one drain covers both.

    With a pipeline of its own, the server stops listening at once but closes the
    connections only when the drain is over (the pipeline is idle, or the time is up):
    uvicorn would otherwise close every WebSocket at once (1012), cancelling requests
    that had time to finish.
    """

    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self._app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drain: Drain | None = getattr(self._app.state, "drain", None)
        if drain is not None:
            drain.begin()
            if drain.owns_pipeline and not self.force_exit:
                for server in self.servers:
                    server.close()
                for sock in sockets or ():
                    sock.close()
                await drain.wait_over()
        await super().shutdown(sockets)
        if self.force_exit and self.started:
            # A second Ctrl-C: uvicorn skips the app's shutdown, which leaves the pipeline's
            # owner to be cancelled at exit (a traceback on the terminal). The drain is
            # over by now, so the app shuts down at once: let it.
            await self.lifespan.shutdown()
