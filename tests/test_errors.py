"""The error tree: drawn as it is built, and every error survives pickle whole."""

from __future__ import annotations

import pickle
import re

import pytest

import orchestrator
from orchestrator import errors
from orchestrator.errors import (
    BackendUnavailable,
    CircuitOpen,
    InferenceError,
    InvalidRequest,
    OrchestratorError,
    Overloaded,
    PipelineClosed,
    QueueFull,
    RateLimited,
    RequestCancelled,
    RequestTimeout,
    StageError,
)

Tree = dict[str, "Tree"]

SAMPLES: dict[type[OrchestratorError], OrchestratorError] = {
    OrchestratorError: OrchestratorError("something went wrong"),
    Overloaded: Overloaded("full", stage="post", retry_after=2.5),
    QueueFull: QueueFull("inference queue is full", stage="inference"),
    PipelineClosed: PipelineClosed("shutting down"),
    RateLimited: RateLimited("u1", limit=3, remaining=0, retry_after=20.0, reset_in=60.0),
    RequestTimeout: RequestTimeout("deadline passed after 2.0s"),
    RequestCancelled: RequestCancelled("cancelled by the caller"),
    StageError: StageError("rag", "KeyError('index')"),
    InvalidRequest: InvalidRequest("unknown priority 'urgent'"),
    BackendUnavailable: BackendUnavailable("Redis at redis://h/0 did not answer PING"),
    InferenceError: InferenceError(
        "openai: 503", worker="openai", status_code=503, retryable=True, retry_after=1.5
    ),
    CircuitOpen: CircuitOpen("breaker 'w' is open", retry_after=4.0, worker="w"),
}
"""One instance of every exported error, each attribute set to something not its default."""


def exported_errors() -> list[type[OrchestratorError]]:
    return [getattr(errors, name) for name in errors.__all__]


def parse_drawing(doc: str) -> tuple[Tree, dict[str, str]]:
    """The tree drawn in ``doc`` and, per parent, its children's branch marks in order.

    The drawing follows ``::``: the root on a line of its own, then ``├── Name`` and
    ``└── Name`` lines, each level four columns further in (``│   `` or blanks); it ends
    at the first blank line.
    """
    lines = doc.split("::", 1)[1].strip("\n").splitlines()
    root = lines[0].strip()
    tree: Tree = {root: {}}
    path: list[tuple[str, Tree]] = [(root, tree[root])]
    marks: dict[str, str] = {}
    for line in lines[1:]:
        if not line.strip():
            break
        match = re.fullmatch(r" {4}((?:│   | {4})*)([├└])── (\w+)(?:\s.*)?", line)
        assert match, f"not a line of the tree: {line!r}"
        depth, mark, name = len(match[1]) // 4, match[2], match[3]
        assert depth < len(path), f"{name} is indented past its parent"
        del path[depth + 1 :]
        parent, children = path[depth]
        children[name] = {}
        marks[parent] = marks.get(parent, "") + mark
        path.append((name, children[name]))
    return tree, marks


def drawn_tree(doc: str) -> Tree:
    return parse_drawing(doc)[0]


def built_tree(cls: type[BaseException]) -> Tree:
    """``cls`` and its subclasses defined in ``orchestrator.errors`` (not a test's or the
    server's own), in the module's order."""
    order = list(vars(errors))
    children = sorted(
        (c for c in cls.__subclasses__() if c.__module__ == errors.__name__),
        key=lambda c: order.index(c.__name__),
    )
    return {c.__name__: built_tree(c) for c in children}


def test_the_drawn_tree_is_the_class_tree() -> None:
    assert errors.__doc__ is not None
    drawn = drawn_tree(errors.__doc__)
    assert drawn == {"OrchestratorError": built_tree(OrchestratorError)}
    assert list(drawn["OrchestratorError"]) == list(built_tree(OrchestratorError))  # order


def test_the_drawing_closes_each_level_with_its_last_child() -> None:
    assert errors.__doc__ is not None
    _, marks = parse_drawing(errors.__doc__)
    for parent, children in marks.items():
        assert children == "├" * (len(children) - 1) + "└", parent


def test_the_tree_drawn_is_every_exported_error() -> None:
    def names(tree: Tree) -> set[str]:
        return set(tree) | {n for sub in tree.values() for n in names(sub)}

    assert errors.__doc__ is not None
    assert names(drawn_tree(errors.__doc__)) == set(errors.__all__)
    assert set(SAMPLES) == set(exported_errors())  # a new error needs a sample below


def test_circuit_open_is_an_inference_error() -> None:
    # The pipeline fails a ticket refused by the breaker as an inference failure.
    assert issubclass(CircuitOpen, InferenceError)
    assert not SAMPLES[CircuitOpen].retryable  # type: ignore[attr-defined]


def test_builtins_are_mixed_in_where_callers_catch_them() -> None:
    assert issubclass(RequestTimeout, TimeoutError)
    assert issubclass(InvalidRequest, ValueError)
    assert not issubclass(BackendUnavailable, ConnectionError)  # the library's own now


def test_every_error_is_exported_from_the_package() -> None:
    for cls in exported_errors():
        assert getattr(orchestrator, cls.__name__) is cls


@pytest.mark.parametrize("cls", exported_errors(), ids=lambda cls: cls.__name__)
def test_every_error_survives_pickle_with_its_message_and_attributes(
    cls: type[OrchestratorError],
) -> None:
    error = SAMPLES[cls]
    assert vars(error) or cls in {
        OrchestratorError,
        PipelineClosed,
        RequestTimeout,
        RequestCancelled,
        InvalidRequest,
    }
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        copy = pickle.loads(pickle.dumps(error, protocol))
        assert type(copy) is cls
        assert str(copy) == str(error)
        assert copy.args == error.args
        assert vars(copy) == vars(error)


def test_a_subclass_of_an_error_survives_pickle_too() -> None:
    copy = pickle.loads(pickle.dumps(_Custom("x", retry_after=3.0)))
    assert type(copy) is _Custom
    assert (str(copy), copy.retry_after) == ("x", 3.0)


class _Custom(CircuitOpen):
    """A user's subclass (module level, so that pickle finds it)."""


def test_rate_limited_tells_the_next_request_from_the_full_bucket() -> None:
    error = RateLimited("u1", limit=3, remaining=0, retry_after=20.0, reset_in=60.0)
    assert (error.retry_after, error.reset_in) == (20.0, 60.0)
    assert str(error) == "session u1 is rate limited, retry in 20.0s"  # the retry hint


def test_circuit_open_keeps_retry_in_as_a_read_only_alias() -> None:
    error = CircuitOpen("open", retry_after=4.0)
    assert error.retry_in == error.retry_after == 4.0
    assert "deprecated" in (CircuitOpen.retry_in.__doc__ or "").lower()
    with pytest.raises(AttributeError):
        error.retry_in = 1.0  # type: ignore[misc]


def test_one_name_for_the_retry_hint() -> None:
    hinted = (Overloaded, RateLimited, InferenceError, CircuitOpen)
    for hinting in hinted:
        assert hasattr(SAMPLES[hinting], "retry_after"), hinting.__name__
    for cls in exported_errors():
        assert not {"retry_in", "reset_after"} & set(vars(SAMPLES[cls])), cls.__name__
