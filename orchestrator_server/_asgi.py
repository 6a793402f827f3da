"""Raw ASGI for the routes a client calls once per request. Private.

Starlette's ``Request``, ``Response`` and router cost more per request than the whole
pipeline behind them; the hot routes (``POST /api/v1/infer``, ``GET /api/v1/result/{id}``
and ``/status/{id}``) read the scope and write the two response messages themselves.

- ``AsgiRoute`` wraps such a route so Starlette's router serves it as an ASGI app (for
  browsers, whose requests go through CORS), while ``EdgeMiddleware`` calls ``endpoint``
  directly for the others (``hot_route``).
- ``read_body`` and ``answer`` are what ``Request.body()`` and ``JSONResponse`` did.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qsl

from orchestrator_server._json import dumps

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

    from starlette.types import Receive, Scope, Send

    Endpoint = Callable[[Scope, Receive, Send], Awaitable[None]]

__all__ = [
    "AsgiRoute",
    "ClientGone",
    "PayloadTooLarge",
    "answer",
    "header",
    "query_param",
    "read_body",
]

_JSON: Final = (b"content-type", b"application/json")


class PayloadTooLarge(Exception):
    """The body exceeded the server's ``max_request_size``; answered as 413."""


class ClientGone(Exception):
    """The client disconnected before its body arrived: there is nobody to answer."""


class AsgiRoute:
    """A raw ASGI route that Starlette's ``Route`` serves as an app (not a function of a
    ``Request``, which it would wrap); ``endpoint`` is the same route, one call shorter."""

    __slots__ = ("endpoint",)

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.endpoint(scope, receive, send)


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of the (lowercase) header ``name``, or ``None``."""
    for key, value in scope["headers"]:
        if key == name:
            decoded: str = value.decode("latin-1")
            return decoded
    return None


def query_param(scope: Scope, name: str) -> str | None:
    """The last value of the query parameter ``name`` (as Starlette's ``query_params``)."""
    raw: bytes = scope.get("query_string", b"")
    if not raw:
        return None
    found = None
    for key, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
        if key == name:
            found = value
    return found


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, refused as soon as it is known to exceed ``limit`` bytes.

    Raises:
        PayloadTooLarge: Declared (``Content-Length``) or sent larger than ``limit``.
        ClientGone: The client disconnected first.
    """
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge
    message = await receive()
    if message["type"] != "http.request":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):  # the usual case: one message
        if len(body) > limit:
            raise PayloadTooLarge
        return body
    chunks, size = [body], len(body)
    while True:
        if size > limit:
            raise PayloadTooLarge
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            if size > limit:
                raise PayloadTooLarge
            return b"".join(chunks)


async def answer(
    send: Send,
    content: object,
    status: int = 200,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Send ``content`` as a JSON response (``dumps``: it always encodes)."""
    body = dumps(content)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [_JSON, (b"content-length", b"%d" % len(body)), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})
