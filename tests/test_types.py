from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator import PromptRequest, RequestStatus, SessionId, shard_session
from orchestrator.types import new_request_id


def test_prompt_request_accepts_a_plain_session_string() -> None:
    request = PromptRequest("u1", "Hi", meta={"priority": "high"})
    assert request.session == SessionId("u1")
    assert str(request.session) == "u1"
    assert request.meta == {"priority": "high"}
    assert uuid.UUID(request.request_id).version == 4


def test_prompt_request_validates() -> None:
    with pytest.raises(TypeError):
        PromptRequest("u1", 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        PromptRequest("u1", "x", timeout=0)


def test_request_ids_are_uuid4_strings() -> None:
    ids = {new_request_id() for _ in range(2000)}
    assert len(ids) == 2000
    for value in list(ids)[:100]:
        parsed = uuid.UUID(value)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == value


def test_terminal_statuses() -> None:
    terminal = {s for s in RequestStatus if s.is_terminal}
    assert {s.value for s in terminal} == {"completed", "failed", "timeout", "cancelled"}
    assert str(RequestStatus.PENDING) == "pending"


@given(st.text(), st.integers(min_value=1, max_value=10_000))
def test_shard_is_in_range_and_deterministic(session: str, shards: int) -> None:
    shard = shard_session(session, shards)
    assert 0 <= shard < shards
    assert shard == shard_session(SessionId(session), shards)


def test_shard_is_stable_across_processes() -> None:
    code = "from orchestrator import shard_session; print(shard_session('user-42', 97))"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert outputs == {f"{shard_session('user-42', 97)}\n"}


def test_shard_rejects_zero_shards() -> None:
    with pytest.raises(ValueError, match="shards"):
        shard_session("u", 0)
