"""Loopback HTTP/1.1 servers that speak each provider's wire protocol, for the worker tests.

A raw ``asyncio.start_server``, not uvicorn: the tests steer the bytes on the wire (an
event split over several chunked-encoding frames, a connection cut mid-body, a stall
after the headers) and see what the client did (each request, each connection, a
disconnect). Each fake checks requests the way its provider does (path, auth headers,
required fields) and answers in the provider's shapes, errors included.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping
    from types import TracebackType
    from typing import Self

JsonObject = dict[str, object]

TOKENS = ["Hello", ",", " wörld", " 👋", "!"]
"""What the fakes answer unless told otherwise (multi-byte characters on purpose)."""


@attrs.frozen
class Request:
    """A request as the fake server received it (header names in lower case)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> JsonObject:
        value = json.loads(self.body)
        assert isinstance(value, dict)
        return value


class Response:
    """How a handler answers: a whole body, or a chunked stream written frame by frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.close_connection = False

    async def body(
        self,
        status: int,
        data: bytes,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        head = self._head(status, {"Content-Type": content_type, **(headers or {})})
        self._writer.write(head + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        await self._writer.drain()

    async def json(
        self, status: int, payload: object, headers: Mapping[str, str] | None = None
    ) -> None:
        await self.body(status, json.dumps(payload).encode(), headers=headers)

    async def start(self, status: int = 200, content_type: str = "text/event-stream") -> None:
        head = self._head(status, {"Content-Type": content_type, "Cache-Control": "no-cache"})
        self._writer.write(head + b"Transfer-Encoding: chunked\r\n\r\n")
        await self._writer.drain()

    async def send(self, data: str, piece: int | None = None) -> None:
        """Write ``data`` as chunked frames of ``piece`` bytes (one frame by default),
        flushing after each."""
        raw = data.encode()
        step = piece or len(raw)
        for i in range(0, len(raw), step):
            part = raw[i : i + step]
            self._writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await self._writer.drain()

    async def end(self) -> None:
        self._writer.write(b"0\r\n\r\n")
        await self._writer.drain()

    def cut(self) -> None:
        """Drop the connection here, mid-body."""
        self.close_connection = True

    async def wait_disconnect(self) -> None:
        """Wait until the client closes the connection."""
        self.close_connection = True
        while await self._reader.read(4096):
            pass

    async def hold(self, gate: asyncio.Event) -> bool:
        """Wait until ``gate`` is set (``True``) or the client goes away (``False``)."""
        opened = asyncio.ensure_future(gate.wait())
        gone = asyncio.ensure_future(self.wait_disconnect())
        await asyncio.wait({opened, gone}, return_when=asyncio.FIRST_COMPLETED)
        opened.cancel()
        gone.cancel()
        await asyncio.gather(opened, gone, return_exceptions=True)
        self.close_connection = not opened.done() or opened.cancelled()
        return not self.close_connection

    @staticmethod
    def _head(status: int, headers: Mapping[str, str]) -> bytes:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = {529: "Overloaded"}.get(status, "Unknown")
        lines = [f"HTTP/1.1 {status} {phrase}", *(f"{k}: {v}" for k, v in headers.items())]
        return ("\r\n".join(lines) + "\r\n").encode()


class FakeServer:
    """Serves ``handler`` on 127.0.0.1, a free port, while the ``async with`` lasts.

    Attributes:
        url: ``http://127.0.0.1:<port>``.
        requests: Every request received, in order.
        connections: How many TCP connections clients opened.
        disconnected: Set when a client closed a connection that a handler was waiting on
            with ``Response.wait_disconnect()``.
    """

    def __init__(self, handler: Callable[[Request, Response], Awaitable[None]]) -> None:
        self.handler = handler
        self.requests: list[Request] = []
        self.connections = 0
        self.disconnected = asyncio.Event()
        self.url = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:  # handlers waiting on the client see the end of it
            writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            while (request := await _read_request(reader)) is not None:
                self.requests.append(request)
                response = Response(reader, writer)
                await self.handler(request, response)
                if response.close_connection:
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass  # only __aexit__ cancels; ending normally keeps asyncio from logging it
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            if reader.at_eof():
                self.disconnected.set()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    line = await reader.readline()
    if not line:
        return None
    method, path, _ = line.decode().split(" ", 2)
    headers: dict[str, str] = {}
    while (raw := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = raw.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = await reader.readexactly(length) if length else b""
    return Request(method, path, headers, body)


@attrs.define(kw_only=True)
class Fake:
    """A provider's behaviour; subclasses render its shapes. Knobs for the failure tests:

    Attributes:
        tokens: The answer, token by token.
        api_key: The key the fake expects (``None``: no auth check).
        fail: Answer every request with this ``(status, body, headers)`` instead.
        piece: Write each event in chunked frames of this many bytes.
        gate: When set, the stream stops after its first token until the event is set.
        cut_after: Drop the connection after this many tokens.
        error_after: Send the provider's error event after this many tokens.
        truncate: End the body cleanly, but without the provider's end-of-answer event.
        stall: Send the response headers, then nothing until the client goes away.
        prompt_tokens: The prompt size the fake reports in its usage.
    """

    tokens: list[str] = attrs.Factory(lambda: list(TOKENS))
    api_key: str | None = None
    fail: tuple[int, object, dict[str, str]] | None = None
    piece: int | None = None
    gate: asyncio.Event | None = None
    cut_after: int | None = None
    error_after: int | None = None
    error_event: str = ""
    truncate: bool = False
    stall: bool = False
    prompt_tokens: int = 9

    async def __call__(self, request: Request, response: Response) -> None:
        if self.fail is not None:
            status, body, headers = self.fail
            if isinstance(body, str):
                await response.body(status, body.encode(), "text/html", headers)
            else:
                await response.json(status, body, headers)
            return
        problem = self.check(request)
        if problem is not None:
            await response.json(*problem)
            return
        payload = request.json()
        if not payload.get("stream"):
            await response.json(200, self.complete(payload))
            return
        await self._stream(payload, response)

    async def _stream(self, payload: JsonObject, response: Response) -> None:
        await response.start()
        if self.stall:
            await response.wait_disconnect()
            return
        for event in self.head(payload):
            await response.send(event, self.piece)
        for i, token in enumerate(self.tokens):
            if i == self.cut_after:
                response.cut()
                return
            if i == self.error_after:
                await response.send(self.error_event, self.piece)
                await response.end()
                return
            await response.send(self.token_event(payload, token, i), self.piece)
            if i == 0 and self.gate is not None and not await response.hold(self.gate):
                return
        if not self.truncate:
            for event in self.tail(payload):
                await response.send(event, self.piece)
        await response.end()

    # What a provider defines:
    def check(self, request: Request) -> tuple[int, JsonObject] | None:
        raise NotImplementedError

    def complete(self, payload: JsonObject) -> JsonObject:
        raise NotImplementedError

    def head(self, payload: JsonObject) -> list[str]:
        return []

    def token_event(self, payload: JsonObject, token: str, index: int) -> str:
        raise NotImplementedError

    def tail(self, payload: JsonObject) -> list[str]:
        raise NotImplementedError


def data(payload: object) -> str:
    return f"data: {json.dumps(payload)}\n\n"


@attrs.define(kw_only=True)
class FakeOpenAi(Fake):
    """OpenAI's Chat Completions and Completions under ``prefix`` (vLLM's shapes with
    ``vllm_errors``: ``{"object": "error", ...}`` bodies)."""

    prefix: str = "/v1"
    vllm_errors: bool = False
    error_event: str = data(
        {"error": {"message": "The server had an error", "type": "server_error", "code": None}}
    )

    def error(self, status: int, message: str, kind: str, code: str | None = None) -> JsonObject:
        if self.vllm_errors:
            return {"object": "error", "message": message, "type": kind, "code": status}
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}

    def check(self, request: Request) -> tuple[int, JsonObject] | None:
        if request.path not in (f"{self.prefix}/chat/completions", f"{self.prefix}/completions"):
            return 404, self.error(404, f"Invalid URL (POST {request.path})", "NotFoundError")
        given = request.headers.get("authorization", "")
        if self.api_key is not None and given != f"Bearer {self.api_key}":
            message = f"Incorrect API key provided: {given.removeprefix('Bearer ')}."
            return 401, self.error(401, message, "invalid_request_error", "invalid_api_key")
        payload = request.json()
        field = "messages" if request.path.endswith("/chat/completions") else "prompt"
        if not payload.get("model") or field not in payload:
            return 400, self.error(400, f"you must provide a model and {field}", "BadRequest")
        return None

    def _chunk(self, payload: JsonObject, choices: list[JsonObject]) -> JsonObject:
        chat = "messages" in payload
        kind = "chat.completion.chunk" if chat else "text_completion"
        return {"id": "cmpl-1", "object": kind, "model": payload["model"], "choices": choices}

    def _usage(self) -> JsonObject:
        n = len(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": n}

    def complete(self, payload: JsonObject) -> JsonObject:
        text = "".join(self.tokens)
        if "messages" in payload:
            choice: JsonObject = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        body = self._chunk(payload, [{**choice, "finish_reason": "stop"}])
        kind = "chat.completion" if "messages" in payload else "text_completion"
        return {**body, "object": kind, "usage": self._usage()}

    def head(self, payload: JsonObject) -> list[str]:
        if "messages" not in payload:
            return []
        delta = {"role": "assistant", "content": ""}
        return [data(self._chunk(payload, [{"index": 0, "delta": delta, "finish_reason": None}]))]

    def token_event(self, payload: JsonObject, token: str, index: int) -> str:
        if "messages" in payload:
            choice: JsonObject = {"index": 0, "delta": {"content": token}, "finish_reason": None}
        else:
            choice = {"index": 0, "text": token, "logprobs": None, "finish_reason": None}
        return data(self._chunk(payload, [choice]))

    def tail(self, payload: JsonObject) -> list[str]:
        last: JsonObject = {"index": 0, "finish_reason": "stop"}
        if "messages" in payload:
            last["delta"] = {}
        else:
            last["text"] = ""
        events = [data(self._chunk(payload, [last]))]
        options = payload.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            events.append(data({**self._chunk(payload, []), "usage": self._usage()}))
        return [*events, "data: [DONE]\n\n"]


def anthropic_error(kind: str, message: str) -> JsonObject:
    return {"type": "error", "error": {"type": kind, "message": message}}


def event(name: str, payload: object) -> str:
    return f"event: {name}\ndata: {json.dumps(payload)}\n\n"


@attrs.define(kw_only=True)
class FakeAnthropic(Fake):
    """Anthropic's Messages API: ``/v1/messages``, ``x-api-key``, ``anthropic-version``."""

    error_event: str = event("error", anthropic_error("overloaded_error", "Overloaded"))

    def check(self, request: Request) -> tuple[int, JsonObject] | None:
        if request.path != "/v1/messages":
            return 404, anthropic_error("not_found_error", "Not Found")
        if self.api_key is not None and request.headers.get("x-api-key") != self.api_key:
            return 401, anthropic_error("authentication_error", "invalid x-api-key")
        if request.headers.get("anthropic-version") != "2023-06-01":
            return 400, anthropic_error(
                "invalid_request_error", "anthropic-version: header is required"
            )
        payload = request.json()
        for field in ("model", "max_tokens", "messages"):
            if field not in payload:
                return 400, anthropic_error("invalid_request_error", f"{field}: Field required")
        return None

    def _message(self, payload: JsonObject, content: list[JsonObject], out: int) -> JsonObject:
        return {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": payload["model"],
            "content": content,
            "stop_reason": "end_turn" if out > 1 else None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": self.prompt_tokens - 2,
                "cache_read_input_tokens": 2,
                "output_tokens": out,
            },
        }

    def complete(self, payload: JsonObject) -> JsonObject:
        text: JsonObject = {"type": "text", "text": "".join(self.tokens)}
        return self._message(payload, [text], len(self.tokens))

    def head(self, payload: JsonObject) -> list[str]:
        start = {"type": "message_start", "message": self._message(payload, [], 1)}
        block = {"type": "text", "text": ""}
        block_start = {"type": "content_block_start", "index": 0, "content_block": block}
        return [
            event("message_start", start),
            event("content_block_start", block_start),
            event("ping", {"type": "ping"}),
        ]

    def token_event(self, payload: JsonObject, token: str, index: int) -> str:
        delta = {"type": "text_delta", "text": token}
        body: JsonObject = {"type": "content_block_delta", "index": 0, "delta": delta}
        return event("content_block_delta", body)

    def tail(self, payload: JsonObject) -> list[str]:
        delta = {"stop_reason": "end_turn", "stop_sequence": None}
        usage = {"output_tokens": len(self.tokens)}
        return [
            event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}),
            event("message_stop", {"type": "message_stop"}),
        ]


def llama_error(code: int, message: str, kind: str) -> JsonObject:
    return {"error": {"code": code, "message": message, "type": kind}}


@attrs.define(kw_only=True)
class FakeLlamaCpp(Fake):
    """llama.cpp's ``llama-server``: native ``/completion``, ``data:`` chunks, ``error:``
    lines for failures mid-stream."""

    error_event: str = (
        'error: {"code": 500, "message": "slot unavailable", "type": "server_error"}\n\n'
    )

    def check(self, request: Request) -> tuple[int, JsonObject] | None:
        if request.path != "/completion":
            return 404, llama_error(404, "File Not Found", "not_found_error")
        given = request.headers.get("authorization")
        if self.api_key is not None and given != f"Bearer {self.api_key}":
            return 401, llama_error(401, "Invalid API Key", "authentication_error")
        if "prompt" not in request.json():
            return 400, llama_error(400, '"prompt" must be provided', "invalid_request_error")
        return None

    def _final(self, content: str) -> JsonObject:
        n = len(self.tokens)
        return {
            "index": 0,
            "content": content,
            "stop": True,
            "model": "model.gguf",
            "tokens_predicted": n,
            "tokens_evaluated": self.prompt_tokens,
            "stop_type": "eos",
            "timings": {"prompt_n": self.prompt_tokens, "predicted_n": n},
        }

    def complete(self, payload: JsonObject) -> JsonObject:
        return self._final("".join(self.tokens))

    def token_event(self, payload: JsonObject, token: str, index: int) -> str:
        return data({"index": 0, "content": token, "tokens": [index], "stop": False})

    def tail(self, payload: JsonObject) -> list[str]:
        return [data(self._final(""))]
