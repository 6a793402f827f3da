"""The serialised form of an error, for crossing processes (a request's record in Redis).

``error_to_dict(exc)`` gives a JSON object::

    {"type": "RateLimited",
     "message": "session u1 is rate limited, retry in 20.0s",
     "attrs": {"session": "u1", "limit": 3, "remaining": 0, "retry_after": 20.0,
               "reset_in": 60.0}}

- ``type`` is the name of a class of ``orchestrator.errors`` (a subclass of one, such as
  the server's ``BadRequest``, is sent as the nearest of them); ``message`` is ``str(exc)``;
  ``attrs`` holds that class's attributes (``ATTRIBUTES``), each a JSON scalar.
- Anything else, a builtin exception or another library's, is sent as an
  ``OrchestratorError`` whose message names its type: ``"KeyError: 'x'"``.
- ``error_from_dict(data)`` rebuilds the error: the same class, ``str``, and attributes.
  It only looks the type up in a fixed table and never imports or calls anything by name,
  so any input is safe: an unknown type (a newer peer's), missing or mistyped attributes,
  or something that is not such an object at all gives an ``OrchestratorError`` carrying
  the message; attributes that do not fit the class give the nearest base class they fit
  (a ``CircuitOpen`` whose ``retry_after`` is ``null`` comes back an ``InferenceError``).
  Attributes it does not know are ignored.
- Not carried: ``__cause__``, ``__context__``, the traceback and notes. The receiving side
  sees what the error says, not where it came from (log it where it was raised).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Final, TypeAlias, TypeGuard, cast

from orchestrator import errors
from orchestrator.errors import OrchestratorError

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["ATTRIBUTES", "JSON", "error_from_dict", "error_to_dict"]

JSON: TypeAlias = "str | int | float | bool | list[JSON] | dict[str, JSON] | None"
"""A value ``json.dumps`` writes and ``json.loads`` gives back."""

_STR: Final = (str,)
_OPT_STR: Final = (str, type(None))
_INT: Final = (int,)
_OPT_INT: Final = (int, type(None))
_FLOAT: Final = (float, int)
_OPT_FLOAT: Final = (float, int, type(None))
_BOOL: Final = (bool,)

ATTRIBUTES: Final[Mapping[type[OrchestratorError], Mapping[str, tuple[type, ...]]]] = {
    errors.OrchestratorError: {},
    errors.Overloaded: {"stage": _STR, "retry_after": _FLOAT},
    errors.QueueFull: {"stage": _STR, "retry_after": _FLOAT},
    errors.PipelineClosed: {},
    errors.RateLimited: {
        "session": _STR,
        "limit": _INT,
        "remaining": _INT,
        "retry_after": _FLOAT,
        "reset_in": _FLOAT,
    },
    errors.RequestTimeout: {},
    errors.RequestCancelled: {},
    errors.StageError: {"stage": _STR},
    errors.InvalidRequest: {},
    errors.BackendUnavailable: {"backend": _STR},
    errors.InferenceError: {
        "worker": _OPT_STR,
        "status_code": _OPT_INT,
        "retryable": _BOOL,
        "retry_after": _OPT_FLOAT,
    },
    errors.CircuitOpen: {
        "worker": _OPT_STR,
        "status_code": _OPT_INT,
        "retryable": _BOOL,
        "retry_after": _FLOAT,
    },
}
"""Every class of ``orchestrator.errors`` and its attributes, with the types each may hold
(``int`` where a ``float`` goes: JSON does not tell ``1.0`` from ``1``)."""

_BY_NAME: Final = {cls.__name__: cls for cls in ATTRIBUTES}

# Each class and its bases in ATTRIBUTES, nearest first (the last is OrchestratorError).
_LINEAGE: Final = {
    cls: tuple(cast("type[OrchestratorError]", c) for c in cls.__mro__ if c in ATTRIBUTES)
    for cls in ATTRIBUTES
}


def error_to_dict(exc: BaseException) -> dict[str, JSON]:
    """The serialised form of ``exc``: ``{"type", "message", "attrs"}`` (see the module).

    Example:
        >>> error_to_dict(errors.StageError("rag", "no index"))
        {'type': 'StageError', 'message': 'rag stage failed: no index', 'attrs': {'stage': 'rag'}}
    """
    cls = next((c for c in type(exc).__mro__ if c in ATTRIBUTES), None)
    if cls is None:  # not ours
        return {"type": "OrchestratorError", "message": _describe(exc), "attrs": {}}
    attrs: dict[str, JSON] = {}
    for name, kinds in ATTRIBUTES[cls].items():
        value = getattr(exc, name, None)
        if _fits(value, kinds):
            attrs[name] = value
    return {"type": cls.__name__, "message": str(exc), "attrs": attrs}


def error_from_dict(data: object) -> OrchestratorError:
    """The error ``error_to_dict`` serialised: the same class, message and attributes.

    Args:
        data: The parsed JSON object. For anything else, or an unknown ``type``, the
            result is an ``OrchestratorError`` with the message; when the attributes do
            not fit the class, the nearest base class they fit (at worst
            ``OrchestratorError``).

    Example:
        >>> error_from_dict({"type": "StageError", "message": "m", "attrs": {"stage": "rag"}})
        StageError('m')
    """
    if not isinstance(data, dict):
        return OrchestratorError(f"an error in an unknown form ({type(data).__name__})")
    message = data.get("message")
    if not isinstance(message, str):
        message = "an error without a message"
    kind = data.get("type")
    named = _BY_NAME.get(kind) if isinstance(kind, str) else None
    attrs = data.get("attrs")
    if named is None or not isinstance(attrs, dict):
        return OrchestratorError(message)
    for cls in _LINEAGE[named]:  # ends at OrchestratorError, which needs no attribute
        schema = ATTRIBUTES[cls]
        if all(name in attrs and _fits(attrs[name], kinds) for name, kinds in schema.items()):
            break
    # Built without __init__, which would word the message anew from the attributes.
    exc = cls.__new__(cls, message)
    for name, kinds in schema.items():
        value = attrs[name]
        if float in kinds and _is_int(value):
            value = float(value)  # JSON may have made ``1.0`` into ``1``
        setattr(exc, name, value)
    return exc


def _fits(value: object, kinds: tuple[type, ...]) -> TypeGuard[str | int | float | bool | None]:
    if isinstance(value, bool):  # a bool is an int to isinstance, never one to us
        return bool in kinds
    if isinstance(value, float) and not math.isfinite(value):
        return False  # JSON has no inf or nan
    return isinstance(value, kinds)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
