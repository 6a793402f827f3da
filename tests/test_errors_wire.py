"""The serialised form of an error: JSON that comes back as the same error, and nothing
but an error whatever it holds."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator._errors_wire import ATTRIBUTES, JSON, error_from_dict, error_to_dict
from orchestrator.errors import (
    CircuitOpen,
    InferenceError,
    InvalidRequest,
    OrchestratorError,
    RateLimited,
    StageError,
)
from orchestrator_server.routes import BadRequest
from tests.test_errors import SAMPLES, exported_errors


def with_attrs(data: dict[str, JSON], **changes: JSON) -> dict[str, JSON]:
    attrs = data["attrs"]
    assert isinstance(attrs, dict)
    return {**data, "attrs": {**attrs, **changes}}


def through_json(exc: BaseException) -> OrchestratorError:
    return error_from_dict(json.loads(json.dumps(error_to_dict(exc), allow_nan=False)))


@pytest.mark.parametrize("cls", exported_errors(), ids=lambda cls: cls.__name__)
def test_every_error_comes_back_with_its_type_message_and_attributes(
    cls: type[OrchestratorError],
) -> None:
    error = SAMPLES[cls]
    copy = through_json(error)
    assert type(copy) is cls
    assert str(copy) == str(error)
    assert copy.args == error.args
    assert vars(copy) == vars(error)
    assert {k: type(v) for k, v in vars(copy).items()} == {
        k: type(v) for k, v in vars(error).items()
    }


def test_the_attribute_table_names_every_class_and_every_attribute() -> None:
    assert set(ATTRIBUTES) == set(exported_errors())
    for cls, schema in ATTRIBUTES.items():
        assert set(schema) == set(vars(SAMPLES[cls])), cls.__name__


def test_the_form_is_plain_and_documented() -> None:
    data = error_to_dict(RateLimited("u1", limit=3, remaining=0, retry_after=20, reset_in=60))
    assert data == {
        "type": "RateLimited",
        "message": "session u1 is rate limited, retry in 20.0s",
        "attrs": {
            "session": "u1",
            "limit": 3,
            "remaining": 0,
            "retry_after": 20,
            "reset_in": 60,
        },
    }
    assert json.loads(json.dumps(data)) == data


def test_a_float_written_as_an_int_comes_back_a_float() -> None:
    data = error_to_dict(CircuitOpen("open", retry_after=2.0))
    data_json = json.loads(json.dumps(data).replace("2.0", "2"))
    copy = error_from_dict(data_json)
    assert isinstance(copy, CircuitOpen)
    assert copy.retry_after == 2.0
    assert isinstance(copy.retry_after, float)


def test_a_subclass_travels_as_its_library_class() -> None:
    copy = through_json(BadRequest("'prompt' must be a non-empty string"))
    assert type(copy) is InvalidRequest
    assert str(copy) == "'prompt' must be a non-empty string"


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (KeyError("x"), "KeyError: 'x'"),
        (RuntimeError("boom"), "RuntimeError: boom"),
        (TimeoutError(), "TimeoutError"),
    ],
)
def test_a_foreign_exception_travels_as_an_orchestrator_error_naming_it(
    exc: BaseException, message: str
) -> None:
    copy = through_json(exc)
    assert type(copy) is OrchestratorError
    assert str(copy) == message


def test_the_cause_is_not_carried() -> None:
    error = StageError("rag", "KeyError('x')")
    error.__cause__ = KeyError("x")
    copy = through_json(error)
    assert copy.__cause__ is None
    assert "cause" not in json.dumps(error_to_dict(error))


@pytest.mark.parametrize(
    "data",
    [
        {"type": "Throttled", "message": "from a newer peer", "attrs": {}},
        {"type": "SystemExit", "message": "never built by name", "attrs": {}},
        {"type": "os.system", "message": "never imported", "attrs": {}},
        {"type": "__class__", "message": "no attribute lookup", "attrs": {}},
        {"type": "RateLimited", "message": "attributes missing", "attrs": {}},
        {"type": "RateLimited", "message": "no attrs at all"},
        {"type": "StageError", "message": "a mistyped one", "attrs": {"stage": 3}},
        {"type": "StageError", "message": "attrs not an object", "attrs": ["stage"]},
        {"type": ["StageError"], "message": "a type that is not a string", "attrs": {}},
    ],
)
def test_anything_unknown_or_malformed_is_an_orchestrator_error_with_the_message(
    data: dict[str, Any],
) -> None:
    copy = error_from_dict(data)
    assert type(copy) is OrchestratorError
    assert str(copy) == data["message"]


def test_attributes_that_do_not_fit_give_the_nearest_base_that_they_fit() -> None:
    data = error_to_dict(CircuitOpen("open", retry_after=4.0, worker="w"))
    copy = error_from_dict(with_attrs(data, retry_after=None))  # an InferenceError may
    assert type(copy) is InferenceError
    assert (str(copy), copy.worker, copy.retry_after) == ("open", "w", None)


def test_a_bool_is_not_an_int_and_nan_is_not_a_float() -> None:
    base = error_to_dict(RateLimited("u", limit=3, remaining=0, retry_after=1, reset_in=2))
    for name, value in (("limit", True), ("retry_after", float("nan"))):
        assert type(error_from_dict(with_attrs(base, **{name: value}))) is OrchestratorError


def test_unknown_attributes_are_ignored() -> None:
    data = with_attrs(error_to_dict(StageError("rag", "x")), __class__="RateLimited")
    copy = error_from_dict(data)
    assert type(copy) is StageError
    assert vars(copy) == {"stage": "rag"}


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
)


@given(_JSON | st.dictionaries(st.sampled_from(["type", "message", "attrs"]), _JSON))
def test_any_json_decodes_to_an_error(data: object) -> None:
    assert isinstance(error_from_dict(data), OrchestratorError)


@given(
    st.sampled_from(sorted(cls.__name__ for cls in ATTRIBUTES)),
    st.text(),
    st.dictionaries(
        st.sampled_from(sorted({n for schema in ATTRIBUTES.values() for n in schema})),
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    ),
)
def test_any_attributes_decode_to_an_error_with_the_message(
    kind: str, message: str, attrs: dict[str, object]
) -> None:
    copy = error_from_dict({"type": kind, "message": message, "attrs": attrs})
    assert str(copy) == message
    named = next(cls for cls in ATTRIBUTES if cls.__name__ == kind)
    assert type(copy) in named.__mro__  # the class named, or a base its attributes fit
    for name in ATTRIBUTES[type(copy)]:
        assert vars(copy)[name] == attrs[name]
