from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator import EchoWorker, ModelWorker
from orchestrator.workers.base import split_tokens


@given(st.text())
def test_tokens_concatenate_back_to_the_text(text: str) -> None:
    assert "".join(split_tokens(text)) == text


def test_tokens_are_words_with_their_leading_whitespace() -> None:
    assert split_tokens("Hello  world\nbye ") == ["Hello", "  world", "\nbye", " "]


@pytest.mark.anyio
async def test_stream_and_infer_agree() -> None:
    worker = EchoWorker.with_delay(1)
    assert isinstance(worker, ModelWorker)
    assert worker.delay == pytest.approx(0.001)
    streamed = [t async for t in worker.stream("a b  c")]
    assert streamed == await worker.infer("a b  c") == ["a", " b", "  c"]


def test_default_delay_is_ten_ms() -> None:
    assert EchoWorker().delay == pytest.approx(0.010)
    with pytest.raises(ValueError, match="delay"):
        EchoWorker(delay=-1)
