"""``RedisRecord``: this process's view of a request whose record lives in Redis. Private.

A request's hash (``{prefix}req:{id}``) holds its status, request, result or error and,
for a request that did not stream, its tokens. A ``RedisRecord`` is the state as of the
last read, kept up to date for the requests this process follows (it admitted or runs
them, or someone here waits on them) by the finish notifications every process hears.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, final

from orchestrator._errors_wire import error_from_dict, error_to_dict
from orchestrator.types import PromptRequest, RequestStatus

if TYPE_CHECKING:
    from collections.abc import Mapping

    from orchestrator._job import Job
    from orchestrator._waiters import Waiters

__all__ = ["RedisRecord", "record_fields"]

_STATUSES = {status.value: status for status in RequestStatus}


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else value.decode("utf-8", "surrogatepass")


def record_fields(job: Job, created_at: float) -> list[str]:
    """The hash fields of a new record for ``job`` (field, value, field, value, ...)."""
    request = job.request
    return [
        "status",
        RequestStatus.PENDING.value,
        "session",
        str(request.session),
        "input",
        request.input,
        "meta",
        json.dumps(request.meta),
        "timeout",
        "" if request.timeout is None else repr(request.timeout),
        "created_at",
        repr(created_at),
        "stream",
        "1" if job.stream else "0",
        "attempt",
        "0",
    ]


@final
class RedisRecord:
    """A request's record as this process knows it (it satisfies ``RequestRecord``)."""

    __slots__ = (
        "attempt",
        "created_at",
        "done_waiters",
        "error",
        "finished_at",
        "id",
        "request",
        "result",
        "status",
        "stream",
        "token_count",
        "tokens",
    )

    def __init__(self, request: PromptRequest, *, stream: bool, created_at: float) -> None:
        self.id = request.request_id
        self.request = request
        self.stream = stream
        self.status = RequestStatus.PENDING
        self.result: str | None = None
        self.error: BaseException | None = None
        self.created_at = created_at
        self.finished_at: float | None = None
        self.token_count = 0
        self.tokens: list[str] | None = None  # a finished request's, when it did not stream
        self.attempt = 0
        self.done_waiters: Waiters | None = None

    def __repr__(self) -> str:
        return f"<RedisRecord {self.id} {self.status.value}>"

    @classmethod
    def from_hash(cls, request_id: str, fields: Mapping[Any, Any]) -> RedisRecord | None:
        """The record a request's hash describes (``None``: not a record)."""
        get = {_text(k): v for k, v in fields.items()}.get
        status = _STATUSES.get(_text(get("status")) or "")
        if status is None:
            return None
        timeout = _text(get("timeout"))
        request = PromptRequest(
            _text(get("session")) or "",
            _text(get("input")) or "",
            json.loads(_text(get("meta")) or "{}"),
            request_id,
            timeout=float(timeout) if timeout else None,
        )
        record = cls(
            request,
            stream=_text(get("stream")) == "1",
            created_at=float(_text(get("created_at")) or 0.0),
        )
        record.update(fields)
        return record

    def heard(self, note: Mapping[str, Any]) -> None:
        """Take the outcome a finish notification carried (``FINISH`` sends it whole when
        it is small)."""
        self.status = _STATUSES[note["status"]]
        self.finished_at = float(note["finished_at"])
        self.result = note.get("result")
        error = note.get("error")
        self.error = error_from_dict(json.loads(error)) if error else None
        tokens = note.get("tokens")
        if tokens is not None:
            self.tokens = json.loads(tokens)
            self.token_count = len(self.tokens or ())

    def update(self, fields: Mapping[Any, Any]) -> None:
        """Take the state a fresh read of the hash shows."""
        get = {_text(k): v for k, v in fields.items()}.get
        status = _STATUSES.get(_text(get("status")) or "")
        if status is None:
            return
        self.status = status
        finished = _text(get("finished_at"))
        self.finished_at = float(finished) if finished else None
        self.result = _text(get("result"))
        error = _text(get("error"))
        self.error = error_from_dict(json.loads(error)) if error else None
        tokens = _text(get("tokens"))
        if tokens is not None:
            self.tokens = json.loads(tokens)
            self.token_count = len(self.tokens or ())
        self.attempt = int(_text(get("attempt")) or 0)


def error_json(error: BaseException | None) -> str:
    """The JSON form of an error, for the record (``""``: none)."""
    return "" if error is None else json.dumps(error_to_dict(error))
