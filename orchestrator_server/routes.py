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
from orchestrator_server._asgi import (
    AsgiRoute,
    ClientGone,
    PayloadTooLarge,
    answer,
    header,
    query_param,
    read_body,
)
from orchestrator_server._json import BadJson, JsonResponse, check_text, loads, quote
from orchestrator_server._middleware import printable

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping

    from starlette.requests import HTTPConnection, Request
    from starlette.types import Receive, Scope, Send

    from orchestrator_server._drain import Drain
    from orchestrator_server.config import ServerConfig

__all__ = [
    "EXCEPTION_HANDLERS",
    "AppState",
    "BadRequest",
    "config_of",
    "drain_of",
    "error_answer",
    "error_response",
    "handles_of",
    "infer",
    "parse_infer",
    "parse_json",
    "rate_headers",
    "result",
    "status",
    "ticket_body",
]

logger = logging.getLogger("orchestrator_server")

_MAX_SESSION_ID = 256
_UNWATCHED = 0.05  # seconds a long-poll waits before it watches its client and the drain


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


def _client_session(scope: Scope) -> str:
    client = scope.get("client")
    return f"ip:{client[0]}" if client else "anonymous"


def _is_json(content_type: str | None) -> bool:
    if content_type is None:
        return False
    media = content_type.partition(";")[0].strip().lower()
    return media in _JSON_TYPES or (media.startswith("application/") and media.endswith("+json"))


async def _infer(scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /api/v1/infer``: submit; answer at once (or stream SSE with ``"stream": true``)."""
    config: ServerConfig = scope["state"]["config"]
    if not _is_json(header(scope, b"content-type")):
        # A browser may POST text/plain cross-origin without a preflight: only JSON is ours.
        message = "the body must be JSON: send Content-Type: application/json"
        await answer(send, {"error": message}, 415)
        return
    try:
        raw = await read_body(scope, receive, config.max_request_size)
    except PayloadTooLarge:
        message = f"request body is larger than {config.max_request_size} bytes"
        await answer(send, {"error": message}, 413)
        return
    except ClientGone:
        return  # nobody to answer, nothing submitted
    try:
        prompt_request, stream = parse_infer(
            parse_json(raw), _client_session(scope), config.timeout_seconds
        )
        handles: PipelineHandles = scope["state"]["handles"]
        ticket = await handles.submit(prompt_request, stream=stream)
    except Exception as exc:
        await error_answer(exc, scope)(scope, receive, send)
        return
    rate = ticket.rate_limit
    if stream:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        if rate is not None:
            headers.update(rate_headers(rate.limit, rate.remaining, rate.reset_in))
        response = StreamingResponse(_sse(ticket), media_type="text/event-stream", headers=headers)
        await response(scope, receive, send)
        return
    if rate is None:
        await answer(send, ticket_body(ticket))
        return
    limits = (
        (b"x-ratelimit-limit", b"%d" % rate.limit),
        (b"x-ratelimit-remaining", b"%d" % rate.remaining),
        (b"x-ratelimit-reset", b"%d" % math.ceil(rate.reset_in)),
    )
    await answer(send, ticket_body(ticket), headers=limits)


infer = AsgiRoute(_infer)


def _event(name: str, data: Mapping[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


async def _sse(ticket: Ticket, *, owner: bool = True) -> AsyncIterator[str]:
    """Server-Sent Events: ``request``, one ``token`` per token, then ``done``. Tokens
    that are waiting together go out in one write (the events are as ``json.dumps`` writes
    them); a lone token goes out at once. The
    ``owner`` stream (the one that submitted it) cancels the request if its client
    leaves before the end; a follower's leaving changes nothing."""
    request_id = ticket.request_id
    done = False
    head = f'event: token\ndata: {{"request_id": {quote(request_id)}, "token": '
    try:
        yield _event("request", {"request_id": request_id, "status": ticket.status.value})
        try:
            async for batch in ticket.token_batches():  # the tokens waiting: one write
                yield "".join([f"{head}{quote(token)}}}\n\n" for token in batch])
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


async def _found(scope: Scope, receive: Receive, send: Send) -> Ticket | None:
    """The ticket the path names, or ``None`` once the 404 (or the error) is answered."""
    handles: PipelineHandles = scope["state"]["handles"]
    try:
        ticket = await handles.find(scope["path_params"]["request_id"])
    except Exception as exc:
        await error_answer(exc, scope)(scope, receive, send)
        return None
    if ticket is None:
        await answer(send, {"error": "unknown request id"}, 404)
    return ticket


async def _status(scope: Scope, receive: Receive, send: Send) -> None:
    """``GET /api/v1/status/{request_id}``: the request as it is now."""
    ticket = await _found(scope, receive, send)
    if ticket is not None:
        await answer(send, ticket_body(ticket))


status = AsgiRoute(_status)


async def _result(scope: Scope, receive: Receive, send: Send) -> None:
    """``GET /api/v1/result/{request_id}``: wait (no polling) up to the timeout, then answer.

    The wait ends early, and frees everything it holds, when the client disconnects; when
    the server's drain runs out of time first, the answer is a 503 with the request's id
    and status (the client may ask again elsewhere). Both are watched from
    ``_UNWATCHED`` seconds into the wait: a request that finishes before costs no watcher.
    """
    ticket = await _found(scope, receive, send)
    if ticket is None:
        return
    config: ServerConfig = scope["state"]["config"]
    limit = config.timeout_seconds
    raw = query_param(scope, "timeout")
    timeout = limit
    if raw is not None:
        try:
            timeout = float(raw)
        except ValueError:
            timeout = math.nan
        if not 0 <= timeout < math.inf:
            await answer(send, {"error": "'timeout' must be a number of seconds >= 0"}, 400)
            return
        timeout = min(timeout, limit)
    drain: Drain = scope["state"]["drain"]
    if not ticket.done() and timeout > 0 and not drain.over:
        # Most requests finish within moments: wait that long without watching the client
        # (a task group of two watchers costs more than the rest of the GET), then watch.
        clock = anyio.current_time
        deadline = clock() + timeout
        if not await ticket.wait(min(timeout, _UNWATCHED)) and not drain.over:
            left = deadline - clock()
            if left > 0:
                await _wait_while_connected(ticket, left, receive, drain)
    if not ticket.done() and drain.over:
        body = ticket_body(ticket)
        body["error"] = "the server is shutting down before the request finished: ask again"
        await answer(send, body, 503, [(b"retry-after", b"1")])
        return
    await answer(send, ticket_body(ticket))


result = AsgiRoute(_result)


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


def rate_headers(limit: int, remaining: int, reset_in: float) -> dict[str, str]:
    """``X-RateLimit-*``: the limit, what is left, and the seconds until the whole quota
    is back (the bucket full), as GitHub's API and the IETF RateLimit draft use them."""
    return {
        "X-RateLimit-Limit": str(limit),
        "X-RateLimit-Remaining": str(remaining),
        "X-RateLimit-Reset": str(math.ceil(reset_in)),
    }


def error_answer(exc: Exception, scope: Scope) -> Response:
    """The JSON answer to an error a route raised: the library's refusals as 4xx and 503
    (with ``Retry-After`` where a retry helps), anything else a logged 500."""
    if isinstance(exc, HTTPException):
        return error_response(exc.status_code, exc.detail, exc.headers)
    if isinstance(exc, RateLimited):
        headers = rate_headers(exc.limit, exc.remaining, exc.reset_in)
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))  # the next request
        return error_response(429, str(exc), headers)
    if isinstance(exc, Overloaded):
        retry = max(1, math.ceil(exc.retry_after))
        return error_response(503, str(exc), {"Retry-After": str(retry)})
    if isinstance(exc, BackendUnavailable):
        logger.warning("%s %s: %s", scope["method"], printable(scope["path"]), exc)
        message = "the request store (Redis) is unavailable: retry shortly"
        return error_response(503, message, {"Retry-After": "1"})
    if isinstance(exc, PipelineClosed):
        return error_response(503, "the server is shutting down", {"Retry-After": "5"})
    if isinstance(exc, InvalidRequest):  # BadRequest too; any other ValueError is a bug: 500
        return error_response(400, str(exc))
    logger.error(
        "unhandled error on %s %s", scope["method"], printable(scope["path"]), exc_info=exc
    )
    return error_response(500, "internal server error")


async def _handle(request: Request, exc: Exception) -> Response:
    return error_answer(exc, request.scope)


EXCEPTION_HANDLERS: dict[Any, Any] = dict.fromkeys(
    (
        HTTPException,
        RateLimited,
        Overloaded,
        PipelineClosed,
        BackendUnavailable,
        InvalidRequest,
        Exception,
    ),
    _handle,
)
"""Library errors to HTTP answers (matched by MRO); ``Exception`` is the last resort."""
