"""JSON in and out at the edge: what a client sends may be hostile, what we answer must
always encode. Private.

- ``loads`` turns every way a body can fail to parse (bad syntax, bad UTF-8, nesting so
  deep the parser recurses out of stack) into ``BadJson`` with a message for the client.
- ``check_text`` refuses text that cannot be written back as UTF-8 (a lone surrogate,
  which JSON's ``\\ud800`` escape can smuggle in): what we accept, we can return.
- ``quote`` writes one string as a JSON string (ASCII escapes, as ``json.dumps`` does),
  for frames built around a fixed head, one per streamed token.
- ``JsonResponse`` never fails to encode: text with a lone surrogate (a worker or a hook
  may still produce one) is written with ASCII escapes instead.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from starlette.responses import JSONResponse

__all__ = ["BadJson", "JsonResponse", "check_text", "dumps", "loads", "quote"]

_SURROGATE: Final = re.compile("[\ud800-\udfff]")


class BadJson(ValueError):
    """The text is not a JSON document we can use; the message is meant for the client."""


def loads(raw: bytes | str) -> Any:
    """Parse a JSON document.

    Raises:
        BadJson: Not JSON, not UTF-8, or nested too deeply.
    """
    try:
        # JSON exchanged between systems is UTF-8 (RFC 8259; a BOM may be ignored): decoding
        # it ourselves skips json.loads' guessing among UTF-8, -16 and -32 (a lone
        # surrogate gets through, as in json.loads, for check_text to name its field).
        return json.loads(
            raw.decode("utf-8-sig", "surrogatepass") if isinstance(raw, bytes) else raw
        )
    except RecursionError:
        raise BadJson("the JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise BadJson("the body is not valid JSON") from None


def check_text(value: str, field: str) -> None:
    """Refuse a string holding a lone surrogate (it has no UTF-8 form).

    Raises:
        BadJson: Naming ``field``.
    """
    if not value.isascii() and _SURROGATE.search(value) is not None:
        raise BadJson(f"'{field}' contains an unpaired UTF-16 surrogate, which is not text")


def dumps(content: Any) -> bytes:
    """Compact UTF-8 JSON; ASCII escapes when the content holds a lone surrogate."""
    try:
        return _ENCODER.encode(content).encode("utf-8")
    except UnicodeEncodeError:
        return _ASCII_ENCODER.encode(content).encode("ascii")


# ``quote(text)``: text as a JSON string, exactly as ``json.dumps(text)`` writes it (in C,
# with no Python frame of ours: it runs once per streamed token).
quote: Final = json.encoder.encode_basestring_ascii

# json.dumps with any argument builds a new encoder per call: a third of its cost.
_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_ASCII_ENCODER: Final = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


class JsonResponse(JSONResponse):
    """Starlette's ``JSONResponse`` that encodes whatever text it is given."""

    def render(self, content: Any) -> bytes:
        return dumps(content)
