"""The HTTP protocol the standalone server runs: uvicorn's, with the edge limits. Private.

uvicorn answers a request it cannot parse (a bad ``Content-Length``, an unknown method, a
request line over the parser's limit) itself, in text/plain, and waits forever for the
first request of a connection. Here:

- those answers are JSON ``{"error": ...}`` with an ``X-Request-ID``, like every other;
- a request head (the request line and headers) must arrive within ``header_timeout``
  seconds of the connection opening, or of its first byte after a keep-alive pause: a
  silent or slowloris connection is answered 408 and closed;
- at most ``max_connections`` connections are open at once; one more is answered 503
  (JSON, ``Retry-After``) and closed, so descriptors stay free for the ones served;
- a connection writes through a ``CoalescingTransport``: what is written to it in one
  event-loop turn leaves in one write (a response's head and body, a WebSocket's frames).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, cast

from orchestrator_server._coalesce import CoalescingTransport
from orchestrator_server._request_ids import next_request_id

if TYPE_CHECKING:
    import asyncio

__all__ = ["edge_protocol"]

logger = logging.getLogger("orchestrator_server")

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 503: b"Service Unavailable"}


def _answer(status: int, message: str, default_headers: Any, extra: bytes = b"") -> bytes:
    """A whole HTTP/1.1 response that closes the connection: JSON, with a request id."""
    body = json.dumps({"error": message}).encode()
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])]
    lines.extend(name + b": " + value + b"\r\n" for name, value in default_headers)
    lines.append(b"content-type: application/json\r\n")
    lines.append(b"content-length: %d\r\n" % len(body))
    lines.append(b"x-request-id: " + next_request_id().encode() + b"\r\n")
    lines.append(extra)
    lines.append(b"connection: close\r\n\r\n")
    lines.append(body)
    return b"".join(lines)


class _EdgeMixin:
    """What both protocol classes add to uvicorn's. ``header_timeout`` and
    ``max_connections`` are set on the class ``edge_protocol`` builds."""

    header_timeout: float
    max_connections: int | None

    # uvicorn's protocol attributes this mixin uses
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    connections: set[Any]
    server_state: Any

    _head_timer: asyncio.TimerHandle | None = None
    _awaiting_head = True
    _refused = False

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        # A stream server's transport (uvloop's are not asyncio.Transport subclasses).
        transport = cast("asyncio.Transport", base)
        limit = self.max_connections
        if limit is not None and len(self.connections) >= limit:
            self._refused = True
            self.transport = transport
            logger.warning("refusing a connection: %d are open (max_connections)", limit)
            transport.write(
                _answer(
                    503,
                    "the server has too many open connections: try again shortly",
                    self.server_state.default_headers,
                    b"retry-after: 1\r\n",
                )
            )
            transport.close()
            return
        coalescing = cast("asyncio.Transport", CoalescingTransport(transport, self.loop))
        super().connection_made(coalescing)  # type: ignore[misc]
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self._refused:
            return
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._awaiting_head and self._head_timer is None:
            self._arm_head_timer()  # the first byte after a keep-alive pause
        super().data_received(data)  # type: ignore[misc]

    def send_400_response(self, msg: str) -> None:
        self._cancel_head_timer()
        self.transport.write(
            _answer(400, "malformed HTTP request", self.server_state.default_headers)
        )
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._awaiting_head = True  # the next request's head is timed from its first byte

    def _head_done(self) -> None:
        self._awaiting_head = False
        self._cancel_head_timer()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._awaiting_head:
            return
        self.transport.write(
            _answer(
                408,
                f"no complete request head within {self.header_timeout:g}s",
                self.server_state.default_headers,
            )
        )
        self.transport.close()


def edge_protocol(
    *, header_timeout: float, max_connections: int | None, http: str = "auto"
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class with the edge limits, for ``uvicorn.Config(http=...)``.

    Args:
        header_timeout: Seconds a request head may take to arrive.
        max_connections: Open connections at most (``None``: no limit).
        http: ``"httptools"``, ``"h11"`` or ``"auto"`` (httptools when installed).
    """
    base: type[asyncio.Protocol]
    if http in ("auto", "httptools"):
        try:
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        except ImportError:
            if http == "httptools":
                raise
        else:

            class EdgeHttpTools(_EdgeMixin, HttpToolsProtocol):
                def on_headers_complete(self) -> None:
                    self._head_done()
                    super().on_headers_complete()

            base = EdgeHttpTools
            return _configured(base, header_timeout, max_connections)
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class EdgeH11(_EdgeMixin, H11Protocol):
        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's head arrived: it has its cycle
                self._head_done()

        def handle_websocket_upgrade(self, event: Any) -> None:
            self._head_done()
            super().handle_websocket_upgrade(event)

    return _configured(EdgeH11, header_timeout, max_connections)


def _configured(
    base: type[asyncio.Protocol], header_timeout: float, max_connections: int | None
) -> type[asyncio.Protocol]:
    return type(
        base.__name__,
        (base,),
        {"header_timeout": header_timeout, "max_connections": max_connections},
    )
