"""HTTP routes: parse, call the library, answer JSON. No policy lives here."""

from __future__ import annotations

import json
import logging
import math
from typing import TYPE_CHECKING, Any, TypedDict

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

import orchestrator
from orchestrator import (
    OrchestratorError,
    Overloaded,
    PipelineClosed,
    PipelineHandles,
    PromptRequest,
    RateLimited,
    Ticket,
    metrics,
)
from orchestrator.enhanced.priority import Priority

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping

    from starlette.requests import HTTPConnection, Request

    from orchestrator_server.config import ServerConfig

__all__ = [
    "EXCEPTION_HANDLERS",
    "AppState",
    "BadRequest",
    "config_of",
    "error_response",
    "handles_of",
    "parse_infer",
    "ticket_body",
]

logger = logging.getLogger("orchestrator_server")

_MAX_SESSION_ID = 256


class AppState(TypedDict):
    """What the lifespan hands every request (``request.state``)."""

    handles: PipelineHandles
    config: ServerConfig


class BadRequest(ValueError):
    """The client sent something we cannot use; answered as 400 with the message."""


class PayloadTooLarge(Exception):
    """The body exceeded ``max_request_size``; answered as 413."""


def parse_infer(payload: object, default_session: str) -> tuple[PromptRequest, bool]:
    """Validate an infer body (HTTP or WebSocket) into a request and its ``stream`` flag.

    Raises:
        BadRequest: With a message naming the offending field.
    """
    if not isinstance(payload, dict):
        raise BadRequest("the body must be a JSON object")
    prompt = payload.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("'prompt' must be a non-empty string")
    session = payload.get("session_id")
    if session is None:
        session = default_session
    elif not isinstance(session, str) or not session or len(session) > _MAX_SESSION_ID:
        raise BadRequest(f"'session_id' must be a string of 1 to {_MAX_SESSION_ID} characters")
    meta = _metadata(payload.get("metadata"))
    try:
        Priority.parse(meta.get("priority"))
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false")
    return PromptRequest(session=session, input=prompt, meta=meta), stream


def _metadata(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest("'metadata' must be an object of strings")
    meta: dict[str, str] = {}
    for key, item in value.items():
        if isinstance(item, str):
            meta[key] = item
        elif isinstance(item, bool | int | float) and item is not None:
            meta[key] = json.dumps(item)
        else:
            raise BadRequest(f"'metadata.{key}' must be a string, number or boolean")
    return meta


def ticket_body(ticket: Ticket) -> dict[str, Any]:
    """The seed's response shape: request_id, status, result, error."""
    error = ticket.error
    return {
        "request_id": ticket.request_id,
        "status": ticket.status.value,
        "result": ticket.text,
        "error": None if error is None else str(error),
    }


def error_response(
    status_code: int, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """``{"error": message}`` with ``status_code``."""
    return JSONResponse({"error": message}, status_code=status_code, headers=headers)


def handles_of(conn: HTTPConnection) -> PipelineHandles:
    """The pipeline the lifespan put in the connection's state."""
    handles: PipelineHandles = conn.scope["state"]["handles"]
    return handles


def config_of(conn: HTTPConnection) -> ServerConfig:
    """The server config the lifespan put in the connection's state."""
    config: ServerConfig = conn.scope["state"]["config"]
    return config


def _client_session(request: Request) -> str:
    client = request.client
    return f"ip:{client.host}" if client else "anonymous"


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


async def infer(request: Request) -> Response:
    """``POST /api/v1/infer``: submit; answer at once (or stream SSE with ``"stream": true``)."""
    config = config_of(request)
    try:
        raw = await _read_body(request, config.max_request_size)
    except PayloadTooLarge:
        return error_response(413, f"request body is larger than {config.max_request_size} bytes")
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return error_response(400, "the body is not valid JSON")
    try:
        prompt_request, stream = parse_infer(payload, _client_session(request))
    except BadRequest as exc:
        return error_response(400, str(exc))
    ticket = await handles_of(request).submit(prompt_request, stream=stream)
    if stream:
        return StreamingResponse(
            _sse(ticket),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return JSONResponse(ticket_body(ticket))


def _event(name: str, data: Mapping[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


async def _sse(ticket: Ticket) -> AsyncIterator[str]:
    """Server-Sent Events: ``request``, one ``token`` per token, then ``done``."""
    request_id = ticket.request_id
    try:
        yield _event("request", {"request_id": request_id, "status": ticket.status.value})
        try:
            async for token in ticket.tokens():
                yield _event("token", {"request_id": request_id, "token": token})
        except OrchestratorError:
            pass  # the final event carries the status and the error
        yield _event("done", ticket_body(ticket))
    finally:
        ticket.cancel_nowait()  # the client left before the end: nobody will read it


def _find(request: Request) -> Ticket:
    ticket = handles_of(request).get(request.path_params["request_id"])
    if ticket is None:
        raise HTTPException(404, "unknown request id")
    return ticket


async def status(request: Request) -> Response:
    """``GET /api/v1/status/{request_id}``: the request as it is now."""
    return JSONResponse(ticket_body(_find(request)))


async def result(request: Request) -> Response:
    """``GET /api/v1/result/{request_id}``: wait (no polling) up to the timeout, then answer."""
    ticket = _find(request)
    limit = config_of(request).timeout_seconds
    raw = request.query_params.get("timeout")
    timeout = limit
    if raw is not None:
        try:
            timeout = float(raw)
        except ValueError:
            timeout = math.nan
        if not 0 <= timeout < math.inf:
            return error_response(400, "'timeout' must be a number of seconds >= 0")
        timeout = min(timeout, limit)
    await ticket.wait(timeout)
    return JSONResponse(ticket_body(ticket))


async def health(request: Request) -> Response:
    """``GET /health``."""
    healthy = not handles_of(request).closed
    return JSONResponse(
        {"status": "healthy" if healthy else "shutting_down", "version": orchestrator.__version__},
        status_code=200 if healthy else 503,
    )


async def metrics_endpoint(request: Request) -> Response:
    """``GET /metrics``: Prometheus text."""
    return Response(metrics.gather_metrics(), media_type=CONTENT_TYPE_LATEST)


# -- errors ----------------------------------------------------------------------------------


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, exc.detail, exc.headers)


async def _rate_limited(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RateLimited)
    reset = max(1, math.ceil(exc.reset_in))
    return error_response(
        429,
        str(exc),
        {
            "Retry-After": str(reset),
            "X-RateLimit-Limit": str(exc.limit),
            "X-RateLimit-Remaining": str(exc.remaining),
            "X-RateLimit-Reset": str(reset),
        },
    )


async def _overloaded(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Overloaded)
    retry = max(1, math.ceil(exc.retry_after))
    return error_response(503, str(exc), {"Retry-After": str(retry)})


async def _closed(request: Request, exc: Exception) -> Response:
    return error_response(503, "the server is shutting down", {"Retry-After": "5"})


async def _bad_value(request: Request, exc: Exception) -> Response:
    return error_response(400, str(exc))


async def _internal(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    HTTPException: _http_error,
    RateLimited: _rate_limited,
    Overloaded: _overloaded,
    PipelineClosed: _closed,
    ValueError: _bad_value,
    Exception: _internal,
}
"""Library errors to HTTP answers (matched by MRO); ``Exception`` is the last resort."""
