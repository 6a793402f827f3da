"""``next_request_id``: the ``X-Request-ID`` of a response whose client sent none. Private.

Unique without a syscall each: a random per-process prefix and a counter (they trace
requests; they guard nothing, unlike pipeline request ids).
"""

from __future__ import annotations

import itertools
import os

__all__ = ["next_request_id"]

_PREFIX = os.urandom(6).hex()
_COUNT = itertools.count(1)


def next_request_id() -> str:
    """A fresh id: ``<12 hex digits>-<hex counter>``."""
    return f"{_PREFIX}-{next(_COUNT):x}"


def _reseed() -> None:
    global _PREFIX, _COUNT
    _PREFIX = os.urandom(6).hex()
    _COUNT = itertools.count(1)


os.register_at_fork(after_in_child=_reseed)  # forked server processes never share ids
