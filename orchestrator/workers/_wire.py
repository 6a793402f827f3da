"""The wire formats' common ground: SSE decoding, JSON field access, usage, retry hints.

Pure functions and small values, no I/O: ``HttpWorker`` (``_http.py``) and each provider's
parser build on them.
"""

from __future__ import annotations

import codecs
import email.utils
import json
import math
import re
import time
from typing import TYPE_CHECKING, Final

import attrs

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "JsonObject",
    "MalformedResponse",
    "SseDecoder",
    "SseEvent",
    "StreamState",
    "TokenUsage",
    "describe_error",
    "error_status",
    "get_count",
    "get_list",
    "get_object",
    "get_text",
    "loads_object",
    "parse_retry_after",
    "retryable_status",
]

JsonObject = dict[str, object]

_LINE_END: Final = re.compile(r"\r\n|\r|\n")
_MAX_LINE: Final = 8 * 1024 * 1024  # an SSE line this long is not a model's output
_MAX_DETAIL: Final = 1000  # characters of a provider's error message kept in ours


@attrs.frozen
class TokenUsage:
    """Token counts of one call, as the provider reported them (``None``: not reported).

    Example:
        >>> TokenUsage(prompt_tokens=12, completion_tokens=30)
        TokenUsage(prompt_tokens=12, completion_tokens=30)
    """

    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class MalformedResponse(ValueError):
    """Raised by the parsers when a 2xx response is not what the wire format promises."""


@attrs.frozen
class SseEvent:
    """One Server-Sent Event: its type (``"message"`` unless named) and its data lines."""

    event: str
    data: str


class SseDecoder:
    """An incremental Server-Sent Events decoder (the WHATWG rules) fed raw bytes.

    Lines may end in CR, LF or CRLF, split anywhere across chunks, as may UTF-8
    characters; comments (``:``) are skipped; an event ends at a blank line, and an
    unterminated one at the end of the stream is dropped, as the spec says.

    Args:
        extra_fields: Field names that start an event of that name carrying the value as
            data (llama.cpp's server writes ``error: {...}`` lines).
    """

    def __init__(self, extra_fields: frozenset[str] = frozenset()) -> None:
        self._extra = extra_fields
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._started = False
        self._after_cr = False
        self._event = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Decode ``chunk`` and return the events it completed."""
        text = self._text.decode(chunk)
        if not text:
            return []
        if not self._started:
            self._started = True
            text = text.removeprefix("\ufeff")
        if self._after_cr and text.startswith("\n"):  # the LF of a CRLF split across chunks
            text = text[1:]
        self._after_cr = text.endswith("\r")
        lines = _LINE_END.split(self._buffer + text)
        self._buffer = lines.pop()
        if len(self._buffer) > _MAX_LINE:
            raise MalformedResponse(f"an event-stream line is longer than {_MAX_LINE} characters")
        events: list[SseEvent] = []
        for line in lines:
            if not line:
                if self._data:
                    events.append(SseEvent(self._event or "message", "\n".join(self._data)))
                self._event = ""
                self._data = []
                continue
            name, _, value = line.partition(":")  # a comment has an empty name
            value = value.removeprefix(" ")
            if name == "data":
                self._data.append(value)
            elif name == "event":
                self._event = value
            elif name in self._extra:
                self._event = name
                self._data.append(value)
            # "id" and "retry" matter to reconnecting browsers, not to one completion.
        return events


@attrs.define
class StreamState:
    """What a stream parser learns while reading one response."""

    done: bool = False
    usage: TokenUsage | None = None


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds a response asks us to wait, from ``retry-after-ms`` (OpenAI) or
    ``Retry-After`` (seconds or an HTTP date, compared with ``now``, a Unix time).

    Returns:
        The delay in seconds (never negative), or ``None`` if absent or unreadable.
    """
    value: float | None = None
    if (millis := headers.get("retry-after-ms")) is not None:
        value = _number(millis)
        value = None if value is None else value / 1000
    if value is None and (raw := headers.get("retry-after")) is not None:
        value = _number(raw)
        if value is None:
            try:
                when = email.utils.parsedate_to_datetime(raw).timestamp()
            except (TypeError, ValueError, IndexError):
                return None
            value = when - (time.time() if now is None else now)
    return None if value is None else max(0.0, value)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def loads_object(text: str) -> JsonObject:
    """Parse a JSON object (``MalformedResponse`` if it is not one)."""
    try:
        value: object = json.loads(text)
    except ValueError as exc:
        raise MalformedResponse(f"invalid JSON ({exc}): {text[:200]!r}") from exc
    if not isinstance(value, dict):
        raise MalformedResponse(f"expected a JSON object, got {text[:200]!r}")
    return value


def describe_error(body: str | JsonObject) -> str:
    """A provider's error body as ``"(type) message"``, whichever shape it has.

    Understands OpenAI's and llama.cpp's ``{"error": {"type", "message"}}``, Anthropic's
    ``{"type": "error", "error": {...}}``, vLLM's ``{"object": "error", "message", "type"}``,
    Ollama's ``{"error": "..."}`` and FastAPI's ``{"detail": ...}``; other text is quoted.
    """
    try:
        data = loads_object(body) if isinstance(body, str) else body
    except MalformedResponse:
        return " ".join(str(body).split())[:_MAX_DETAIL] or "(empty body)"
    error = data.get("error")
    source = error if isinstance(error, dict) else data
    message = error if isinstance(error, str) else source.get("message", source.get("detail"))
    kind = source.get("type") or source.get("code") or data.get("error_type")
    detail = message if isinstance(message, str) else json.dumps(message or data)
    return f"({kind}) {detail[:_MAX_DETAIL]}" if kind else detail[:_MAX_DETAIL]


def get_object(data: JsonObject, key: str) -> JsonObject:
    """``data[key]`` if it is a JSON object, else ``MalformedResponse``."""
    if isinstance(value := data.get(key), dict):
        return value
    raise MalformedResponse(f"expected an object at {key!r}, got {value!r:.100}")


def get_list(data: JsonObject, key: str) -> list[object]:
    """``data[key]`` if it is a JSON array, else ``MalformedResponse``."""
    if isinstance(value := data.get(key), list):
        return value
    raise MalformedResponse(f"expected an array at {key!r}, got {value!r:.100}")


def get_text(data: JsonObject, key: str) -> str:
    """``data[key]`` if it is a string, ``""`` if absent or null, else ``MalformedResponse``."""
    if isinstance(value := data.get(key), str):
        return value
    if value is None:
        return ""
    raise MalformedResponse(f"expected a string at {key!r}, got {value!r:.100}")


def get_count(data: JsonObject, *keys: str) -> int | None:
    """The sum of the integer fields ``keys`` present in ``data``; ``None`` if none is."""
    counts = [v for k in keys if isinstance(v := data.get(k), int) and not isinstance(v, bool)]
    return sum(counts) if counts else None


def retryable_status(status: int) -> bool:
    """Whether a request answered with ``status`` may succeed if sent again."""
    return status in (408, 429) or status >= 500


def error_status(code: object) -> int | None:
    """An error body's ``code`` if it is an HTTP error status (vLLM, llama.cpp send one)."""
    return code if isinstance(code, int) and 400 <= code < 600 else None
