"""Value types that flow through the pipeline."""

from __future__ import annotations

import enum
import functools
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
    return value if isinstance(value, SessionId) else _session_of(value)


@functools.lru_cache(maxsize=4096)
def _session_of(value: str) -> SessionId:
    # Sessions repeat (a user sends many requests) and a SessionId is immutable: share them.
    return SessionId(value)


_POOL_IDS = 256  # ids' worth of random bytes read at once: one syscall per 256 ids
_pool = ""  # hex digits
_at = 0
# The RFC 4122 variant: the 17th digit is 8, 9, a or b (its two top bits 10).
_VARIANT = dict(zip("0123456789abcdef", "89ab89ab89ab89ab", strict=True))


def new_request_id() -> str:
    """Return a fresh request id: a random (version 4) UUID as a string.

    The same bits as ``str(uuid.uuid4())`` (``os.urandom``, read 4 KiB at a time so one
    system call serves 256 ids), formatted without the UUID object, which cost more than
    a request's trip through the pipeline.
    """
    global _pool, _at
    a = _at
    if a >= len(_pool):
        _pool, a = os.urandom(16 * _POOL_IDS).hex(), 0
    _at = a + 32
    h = _pool
    return (
        f"{h[a : a + 8]}-{h[a + 8 : a + 12]}-4{h[a + 13 : a + 16]}-"
        f"{_VARIANT[h[a + 16]]}{h[a + 17 : a + 20]}-{h[a + 20 : a + 32]}"
    )


def _reseed() -> None:
    global _pool, _at
    _pool, _at = "", 0


os.register_at_fork(after_in_child=_reseed)  # a forked process never repeats its parent's ids


@attrs.define(eq=False, slots=True, init=False, on_setattr=attrs.setters.NO_OP)
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

    session: SessionId
    input: str
    meta: dict[str, str]
    request_id: str
    timeout: float | None

    # Written out rather than generated: attrs' converters and validators cost more than
    # the request's whole trip through the pipeline, and every request is made here.
    def __init__(
        self,
        session: SessionId | str,
        input: str,  # noqa: A002 - the seed's field name
        meta: Mapping[str, str] | None = None,
        request_id: str | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        self.session = session if type(session) is SessionId else _to_session(session)
        if not isinstance(input, str):
            raise TypeError(f"'input' must be a str, got {type(input).__name__}")
        self.input = input
        self.meta = {} if meta is None else dict(meta)
        self.request_id = new_request_id() if request_id is None else request_id
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.timeout = timeout


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
