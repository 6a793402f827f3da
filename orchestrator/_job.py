"""``Job``: what the machinery moves for one request. Private.

Plain data: a store, a queue or another process can hold it (it pickles, and ``to_dict`` /
``from_dict`` give the JSON form the Redis seams carry). The caller's side is the
``Ticket``, a read-only view; a job is changed only by the stage that holds it: RAG sets
``context``, Assemble ``prompt``, Inference ``output`` (the tokens joined), Post ``output``
again (processed).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, final

from orchestrator._priority import Priority
from orchestrator.types import PromptRequest

if TYPE_CHECKING:
    from collections.abc import Mapping

    from orchestrator._seams import RequestRecord

__all__ = ["Job"]


@final
class Job:
    """One request's work.

    Attributes:
        id: The request id.
        request: The request as submitted.
        priority: Its level in the inference queue.
        deadline: When it times out: absolute, on the pipeline's clock (the event loop's
            time). ``to_dict`` carries it as wall-clock time, so a process with another
            clock can place it on its own.
        stream: Produce it with ``worker.stream()`` (tokens reach readers as they come);
            decided at submit.
        attempt: Deliveries so far (1 the first time; a work queue that redelivers a
            job after its taker died counts up).
        cache_key: Where its result goes in the response cache, if anywhere.
        context: What the retriever found (after RAG).
        prompt: What the worker is sent (after Assemble).
        output: The text so far: the tokens joined (after Inference), then processed
            (after Post).
        record: This process's record of the request: ``record.finished_at`` says
            whether it has finished (skip it, do not start it). Not part of the job's
            data: a process that takes the job from a shared queue links its own.
    """

    __slots__ = (
        "attempt",
        "cache_key",
        "context",
        "deadline",
        "id",
        "output",
        "priority",
        "prompt",
        "record",
        "request",
        "stream",
    )
    _DATA = (
        "attempt",
        "cache_key",
        "context",
        "deadline",
        "id",
        "output",
        "priority",
        "prompt",
        "request",
        "stream",
    )

    def __init__(
        self,
        record: RequestRecord,
        request: PromptRequest,
        priority: Priority,
        deadline: float,
        stream: bool = False,
        cache_key: str | None = None,
        attempt: int = 1,
        context: str = "",
        prompt: str = "",
        output: str = "",
    ) -> None:
        self.record = record
        self.id = request.request_id
        self.request = request
        self.priority = priority
        self.deadline = deadline
        self.stream = stream
        self.attempt = attempt
        self.cache_key = cache_key
        self.context = context
        self.prompt = prompt
        self.output = output

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.priority!s} attempt {self.attempt}>"

    def __getstate__(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._DATA}

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        for name in self._DATA:
            setattr(self, name, state[name])

    def to_dict(self, now: float) -> dict[str, Any]:
        """The JSON form: the request's fields, and the deadline as wall-clock time
        (``deadline_at``, ``time.time()`` seconds: clocks of other processes differ, and
        the job may wait in a queue), placed from ``now`` on this process's clock."""
        request = self.request
        return {
            "id": self.id,
            "session": str(request.session),
            "input": request.input,
            "meta": dict(request.meta),
            "timeout": request.timeout,
            "priority": str(self.priority),
            "deadline_at": time.time() + (self.deadline - now),
            "stream": self.stream,
            "attempt": self.attempt,
            "cache_key": self.cache_key,
            "context": self.context,
            "prompt": self.prompt,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], now: float, record: RequestRecord) -> Job:
        """The job ``to_dict`` described, its deadline placed on this process's clock
        (``now`` is its time), linked to this process's ``record`` of it.

        Raises:
            KeyError, TypeError, ValueError: ``data`` is not such a form.
        """
        request = PromptRequest(
            session=data["session"],
            input=data["input"],
            meta=data["meta"],
            request_id=data["id"],
            timeout=data["timeout"],
        )
        return cls(
            record,
            request,
            Priority.parse(data["priority"]),
            now + (float(data["deadline_at"]) - time.time()),
            bool(data["stream"]),
            data["cache_key"],
            int(data["attempt"]),
            data["context"],
            data["prompt"],
        )
