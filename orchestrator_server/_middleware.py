"""``EdgeMiddleware``: the one middleware in front of the routes. Private.

Every HTTP response gets an ``X-Request-ID`` (the client's, if sane); one access-log line
per request, every field escaped (``printable``) so a client cannot forge log lines or
write terminal escapes; an error that escaped the routes becomes a JSON 500; requests that
carry an ``Origin`` (browsers) go through CORS, whose refusals are JSON too.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Final

from starlette.middleware.cors import CORSMiddleware

from orchestrator_server._json import JsonResponse
from orchestrator_server._request_ids import next_request_id

if TYPE_CHECKING:
    from collections.abc import Callable

    from starlette.datastructures import Headers
    from starlette.responses import Response
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["EdgeMiddleware", "printable"]

access_logger = logging.getLogger("orchestrator_server.access")
logger = logging.getLogger("orchestrator_server")

_SANE_ID: Final = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# C0 and C1 controls, DEL, and the Unicode line breaks and bidi controls that rewrite
# what a terminal or log viewer shows.
_UNPRINTABLE: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n`` -> ``\\x0a``)."""
    if text.isprintable():
        return text
    return _UNPRINTABLE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class _JsonCors(CORSMiddleware):
    """Starlette's CORS, answering preflights in JSON like every other response."""

    def preflight_response(self, request_headers: Headers) -> Response:
        plain = super().preflight_response(request_headers)
        headers = {k: v for k, v in plain.headers.items() if k not in _BODY_HEADERS}
        if plain.status_code == 200:
            return JsonResponse({"status": "ok"}, headers=headers)
        reason = bytes(plain.body).decode()  # "Disallowed CORS origin, method"
        return JsonResponse({"error": reason}, status_code=plain.status_code, headers=headers)


_BODY_HEADERS: Final = frozenset({"content-type", "content-length"})


class EdgeMiddleware:
    """Request ids, the access log, the last-resort 500, CORS for browsers.

    Requests without an ``Origin`` header skip CORS (it cost more than our whole route),
    with ``Vary: Origin`` kept; of those, the ones ``hot_route`` names an app for go
    straight to it, past Starlette's exception middleware and router.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        access_log: bool = True,
        cors_origins: tuple[str, ...] = ("*",),
        hot_route: Callable[[Scope], ASGIApp | None] | None = None,
    ) -> None:
        self.app = app
        self.access_log = access_log
        self.hot_route = hot_route
        self.cors = _JsonCors(
            app,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=[
                "X-Request-ID",
                "Retry-After",
                "X-RateLimit-Limit",
                "X-RateLimit-Remaining",
                "X-RateLimit-Reset",
            ],
        )

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
        if inner is self.app and self.hot_route is not None:
            inner = self.hot_route(scope) or inner
        request_id = request_id or next_request_id()
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
            logger.exception(
                "unhandled error on %s %s", printable(scope["method"]), printable(scope["path"])
            )
            if not response_started:
                await JsonResponse({"error": "internal server error"}, status_code=500)(
                    scope, receive, send_with_id
                )
        finally:
            if self.access_log:
                self._log(scope, status, started, request_id)

    @staticmethod
    def _log(scope: Scope, status: int, started: float, request_id: str) -> None:
        client = scope.get("client")
        method, path = printable(scope["method"]), printable(scope["path"])
        duration_ms = (time.perf_counter() - started) * 1000
        access_logger.info(
            '%s "%s %s" %d %.2fms id=%s',
            client[0] if client else "-",
            method,
            path,
            status,
            duration_ms,
            request_id,
            extra={
                "request_id": request_id,
                "method": method,
                "path": path,
                "status": status,
                "duration_ms": duration_ms,
            },
        )
