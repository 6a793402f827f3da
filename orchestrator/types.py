"""Value types that flow through the pipeline."""

from __future__ import annotations

import enum
import hashlib
import os
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "AssembleOutput",
    "InferenceOutput",
    "PostOutput",
    "PromptRequest",
    "RagOutput",
    "RequestStatus",
    "SessionId",
    "new_request_id",
    "shard_session",
]


@attrs.frozen(order=True)
class SessionId:
    """The session (user, conversation) a request belongs to.

    Rate limits are per session, and ``shard_session`` maps a session to a shard.

    Example:
        >>> SessionId("user-123")
        SessionId('user-123')
    """

    value: str = attrs.field(validator=attrs.validators.instance_of(str))

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return f"SessionId({self.value!r})"


def _to_session(value: SessionId | str) -> SessionId:
    return value if isinstance(value, SessionId) else SessionId(value)


def _to_meta(value: Mapping[str, str] | None) -> dict[str, str]:
    return {} if value is None else dict(value)


def new_request_id() -> str:
    """Return a fresh request id: a random (version 4) UUID as a string.

    Same bits as ``str(uuid.uuid4())`` (os.urandom), formatted without the UUID object,
    which cost more than a request's trip through the pipeline.
    """
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _check_timeout(
    _inst: object, _attr: attrs.Attribute[float | None], value: float | None
) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {value!r}")


@attrs.define(eq=False, slots=True)
class PromptRequest:
    """One prompt submitted to the pipeline.

    Args:
        session: The session it belongs to (a plain ``str`` is accepted).
        input: The user's text.
        meta: Free-form string metadata; ``meta["priority"]`` is one of critical, high,
            normal (the default) or low.
        request_id: A unique id, a uuid4 string unless given.
        timeout: Seconds from submission to the deadline; ``None`` uses the pipeline's
            ``request_timeout``.

    Example:
        >>> PromptRequest(session="u1", input="Hi", meta={"priority": "high"}).session
        SessionId('u1')
    """

    session: SessionId = attrs.field(converter=_to_session)
    input: str = attrs.field(validator=attrs.validators.instance_of(str))
    meta: dict[str, str] = attrs.field(factory=dict, converter=_to_meta)
    request_id: str = attrs.field(factory=new_request_id)
    timeout: float | None = attrs.field(default=None, validator=_check_timeout, kw_only=True)


class RequestStatus(enum.StrEnum):
    """Where a request is. The last four are terminal: a request reaches exactly one."""

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """Whether the request has finished (completed, failed, timeout or cancelled)."""
        return self not in (RequestStatus.PENDING, RequestStatus.PROCESSING)

    def __str__(self) -> str:
        return self.value


@attrs.frozen
class RagOutput:
    """What the RAG stage produced: the request and its retrieved context."""

    request: PromptRequest
    context: str


@attrs.frozen
class AssembleOutput:
    """What the Assemble stage produced: the prompt sent to the worker."""

    request: PromptRequest
    prompt: str


@attrs.frozen
class InferenceOutput:
    """What the Inference stage produced: the tokens, which concatenate to the output."""

    request: PromptRequest
    tokens: list[str]


@attrs.frozen
class PostOutput:
    """What the Post stage produced: the final text handed to the output sinks."""

    request: PromptRequest
    text: str


def shard_session(session: SessionId | str, shards: int) -> int:
    """Map a session to one of ``shards`` shards, the same in every process.

    Python's ``hash()`` is salted per process, so this uses BLAKE2b instead.

    Raises:
        ValueError: If ``shards`` is less than 1.
    """
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    digest = hashlib.blake2b(str(session).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards
