"""HTTP routes: parse, call the library, answer JSON. No policy lives here."""

from __future__ import annotations

import json
import logging
import math
from typing import TYPE_CHECKING, Any, Final, TypedDict

import anyio
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.responses import Response, StreamingResponse

import orchestrator
from orchestrator import (
    BackendUnavailable,
    InvalidRequest,
    OrchestratorError,
    Overloaded,
    PipelineClosed,
    PipelineHandles,
    PromptRequest,
    RateLimited,
    Ticket,
    metrics,
)
from orchestrator_server._json import BadJson, JsonResponse, check_text, loads
from orchestrator_server._middleware import printable

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping

    from starlette.requests import HTTPConnection, Request
    from starlette.types import Receive

    from orchestrator_server._drain import Drain
    from orchestrator_server.config import ServerConfig

__all__ = [
    "EXCEPTION_HANDLERS",
    "AppState",
    "BadRequest",
    "config_of",
    "drain_of",
    "error_response",
    "handles_of",
    "parse_infer",
    "parse_json",
    "rate_headers",
    "ticket_body",
]

logger = logging.getLogger("orchestrator_server")

_MAX_SESSION_ID = 256


class AppState(TypedDict):
    """What the lifespan hands every request (``request.state``)."""

    handles: PipelineHandles
    config: ServerConfig
    drain: Drain


class BadRequest(InvalidRequest):
    """The client sent something we cannot use; answered as 400 with the message.

    An ``InvalidRequest`` (and so a ``ValueError``), like the library's own refusals of a
    request's content at ``submit``, which get the same answer.
    """


_JSON_TYPES: Final = ("application/json",)


def parse_json(raw: bytes | str) -> object:
    """A client's JSON document (an HTTP body or a WebSocket message).

    Raises:
        BadRequest: Not JSON, not UTF-8, or nested too deeply to parse.
    """
    try:
        return loads(raw)
    except BadJson as exc:
        raise BadRequest(str(exc)) from None


class PayloadTooLarge(Exception):
    """The body exceeded ``max_request_size``; answered as 413."""


def parse_infer(
    payload: object, default_session: str, max_timeout: float
) -> tuple[PromptRequest, bool]:
    """Validate an infer body (HTTP or WebSocket) into a request and its ``stream`` flag.

    Args:
        payload: The parsed JSON.
        default_session: The session of a body without ``session_id``.
        max_timeout: The largest ``timeout`` (seconds) a body may ask for.

    Raises:
        BadRequest: With a message naming the offending field.
    """
    if not isinstance(payload, dict):
        raise BadRequest("the body must be a JSON object")
    try:
        prompt = payload.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRequest("'prompt' must be a non-empty string")
        check_text(prompt, "prompt")
        session = payload.get("session_id")
        if session is None:
            session = default_session
        elif not isinstance(session, str) or not session or len(session) > _MAX_SESSION_ID:
            raise BadRequest(f"'session_id' must be a string of 1 to {_MAX_SESSION_ID} characters")
        check_text(session, "session_id")
        meta = _metadata(payload.get("metadata"))
    except BadJson as exc:
        raise BadRequest(str(exc)) from None
    # An unknown metadata.priority is the library's to refuse: submit raises InvalidRequest.
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false")
    timeout = _timeout(payload.get("timeout"), max_timeout)
    return PromptRequest(session=session, input=prompt, meta=meta, timeout=timeout), stream


def _metadata(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest("'metadata' must be an object of strings")
    meta: dict[str, str] = {}
    for key, item in value.items():
        check_text(key, "metadata")
        if isinstance(item, str):
            check_text(item, f"metadata.{key}")
            meta[key] = item
        elif isinstance(item, bool | int | float) and item is not None:
            meta[key] = json.dumps(item)
        else:
            raise BadRequest(f"'metadata.{key}' must be a string, number or boolean")
    return meta


def _timeout(value: object, limit: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= limit:
        raise BadRequest(f"'timeout' must be a number of seconds > 0 and <= {limit:g}")
    return float(value)


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
) -> JsonResponse:
    """``{"error": message}`` with ``status_code``."""
    return JsonResponse({"error": message}, status_code=status_code, headers=headers)


def handles_of(conn: HTTPConnection) -> PipelineHandles:
    """The pipeline the lifespan put in the connection's state."""
    handles: PipelineHandles = conn.scope["state"]["handles"]
    return handles


def config_of(conn: HTTPConnection) -> ServerConfig:
    """The server config the lifespan put in the connection's state."""
    config: ServerConfig = conn.scope["state"]["config"]
    return config


def drain_of(conn: HTTPConnection) -> Drain:
    """The server's drain the lifespan put in the connection's state."""
    drain: Drain = conn.scope["state"]["drain"]
    return drain


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


def _is_json(content_type: str | None) -> bool:
    if content_type is None:
        return False
    media = content_type.partition(";")[0].strip().lower()
    return media in _JSON_TYPES or (media.startswith("application/") and media.endswith("+json"))


async def infer(request: Request) -> Response:
    """``POST /api/v1/infer``: submit; answer at once (or stream SSE with ``"stream": true``)."""
    config = config_of(request)
    if not _is_json(request.headers.get("content-type")):
        # A browser may POST text/plain cross-origin without a preflight: only JSON is ours.
        return error_response(415, "the body must be JSON: send Content-Type: application/json")
    try:
        raw = await _read_body(request, config.max_request_size)
    except PayloadTooLarge:
        return error_response(413, f"request body is larger than {config.max_request_size} bytes")
    try:
        prompt_request, stream = parse_infer(
            parse_json(raw), _client_session(request), config.timeout_seconds
        )
    except BadRequest as exc:
        return error_response(400, str(exc))
    ticket = await handles_of(request).submit(prompt_request, stream=stream)
    rate = ticket.rate_limit
    headers = None if rate is None else rate_headers(rate.limit, rate.remaining, rate.reset_in)
    if stream:
        return StreamingResponse(
            _sse(ticket),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
        )
    return JsonResponse(ticket_body(ticket), headers=headers)


def _event(name: str, data: Mapping[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


async def _sse(ticket: Ticket, *, owner: bool = True) -> AsyncIterator[str]:
    """Server-Sent Events: ``request``, one ``token`` per token, then ``done``. The
    ``owner`` stream (the one that submitted it) cancels the request if its client
    leaves before the end; a follower's leaving changes nothing."""
    request_id = ticket.request_id
    done = False
    try:
        yield _event("request", {"request_id": request_id, "status": ticket.status.value})
        try:
            async for token in ticket.tokens():
                yield _event("token", {"request_id": request_id, "token": token})
        except OrchestratorError:
            pass  # the final event carries the status and the error
        yield _event("done", ticket_body(ticket))
        done = True
    finally:
        if owner and not done:
            ticket.cancel_nowait()  # the client left before the end: nobody will read it


async def follow_tokens(request: Request) -> Response:
    """``GET /api/v1/tokens/{request_id}``: a request's tokens as Server-Sent Events, from
    the first, on any replica (as the ``"stream": true`` answer, without cancelling the
    request when this client leaves)."""
    ticket = await _find(request)
    return StreamingResponse(
        _sse(ticket, owner=False),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _find(request: Request) -> Ticket:
    ticket = await handles_of(request).find(request.path_params["request_id"])
    if ticket is None:
        raise HTTPException(404, "unknown request id")
    return ticket


async def status(request: Request) -> Response:
    """``GET /api/v1/status/{request_id}``: the request as it is now."""
    return JsonResponse(ticket_body(await _find(request)))


async def result(request: Request) -> Response:
    """``GET /api/v1/result/{request_id}``: wait (no polling) up to the timeout, then answer.

    The wait ends early, and frees everything it holds, when the client disconnects; when
    the server's drain runs out of time first, the answer is a 503 with the request's id
    and status (the client may ask again elsewhere).
    """
    ticket = await _find(request)
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
    drain = drain_of(request)
    if not ticket.done() and timeout > 0:
        await _wait_while_connected(ticket, timeout, request.receive, drain)
    if not ticket.done() and drain.over:
        body = ticket_body(ticket)
        body["error"] = "the server is shutting down before the request finished: ask again"
        return JsonResponse(body, status_code=503, headers={"Retry-After": "1"})
    return JsonResponse(ticket_body(ticket))


async def _wait_while_connected(
    ticket: Ticket, seconds: float, receive: Receive, drain: Drain
) -> None:
    """Wait for ``ticket`` at most ``seconds``, and no longer than the client stays
    connected or the server's drain lasts."""
    async with anyio.create_task_group() as tg:

        async def watch(until: Any) -> None:
            await until()
            tg.cancel_scope.cancel()

        tg.start_soon(watch, lambda: _disconnected(receive))
        tg.start_soon(watch, drain.wait_over)
        await ticket.wait(seconds)
        tg.cancel_scope.cancel()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass  # the (empty) body of the GET


async def cancel(request: Request) -> Response:
    """``DELETE /api/v1/requests/{request_id}``: cancel the request wherever it is (its
    worker call included) and answer its status; a finished request keeps its own."""
    ticket = await _find(request)
    await ticket.cancel()
    return JsonResponse(ticket_body(ticket))


async def health(request: Request) -> Response:
    """``GET /health``."""
    healthy = not handles_of(request).closed and not drain_of(request).begun
    return JsonResponse(
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


def rate_headers(limit: int, remaining: int, reset_in: float) -> dict[str, str]:
    """``X-RateLimit-*``: the limit, what is left, and the seconds until the whole quota
    is back (the bucket full), as GitHub's API and the IETF RateLimit draft use them."""
    return {
        "X-RateLimit-Limit": str(limit),
        "X-RateLimit-Remaining": str(remaining),
        "X-RateLimit-Reset": str(math.ceil(reset_in)),
    }


async def _rate_limited(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RateLimited)
    headers = rate_headers(exc.limit, exc.remaining, exc.reset_in)
    headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))  # the next request
    return error_response(429, str(exc), headers)


async def _overloaded(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Overloaded)
    retry = max(1, math.ceil(exc.retry_after))
    return error_response(503, str(exc), {"Retry-After": str(retry)})


async def _unavailable(request: Request, exc: Exception) -> Response:
    logger.warning("%s %s: %s", request.method, printable(request.url.path), exc)
    return error_response(
        503,
        "the request store (Redis) is unavailable: retry shortly",
        {"Retry-After": "1"},
    )


async def _closed(request: Request, exc: Exception) -> Response:
    return error_response(503, "the server is shutting down", {"Retry-After": "5"})


async def _invalid_request(request: Request, exc: Exception) -> Response:
    return error_response(400, str(exc))


async def _internal(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    HTTPException: _http_error,
    RateLimited: _rate_limited,
    Overloaded: _overloaded,
    PipelineClosed: _closed,
    BackendUnavailable: _unavailable,
    InvalidRequest: _invalid_request,  # BadRequest too; any other ValueError is a bug: 500
    Exception: _internal,
}
"""Library errors to HTTP answers (matched by MRO); ``Exception`` is the last resort."""
