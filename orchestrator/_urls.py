"""``redact_url``: a URL as messages and logs may show it, its credentials masked."""

from __future__ import annotations

import re
from typing import Final

__all__ = ["redact_url"]

# redis-py also reads a password from the query (unix:///tmp/redis.sock?password=...).
_QUERY_PASSWORD: Final = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with its credentials masked, e.g. ``http://user:***@host/v1``.

    The userinfo's password becomes ``***``, and so does a user name that stands alone
    (often a token), and a ``password=`` value in the query. ``url`` need not be valid
    (error messages quote invalid ones): everything between ``://`` and the last ``@``
    counts as userinfo, so no piece of a password holding ``/``, ``?`` or ``#`` shows.

    Example:
        >>> redact_url("redis://default:s3cret@cache:6379/0")
        'redis://default:***@cache:6379/0'
    """
    head, sep, rest = url.partition("://")
    if not sep:  # "user:pass@host:8080", the scheme forgotten
        head, rest = "", url
    userinfo, at, host = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}:***@{host}" if colon else f"***@{host}"
    return head + sep + _QUERY_PASSWORD.sub(r"\1***", rest)
