"""Worker tests: a clean environment, and the opt-in ``e2e`` tests against real servers."""

from __future__ import annotations

import pytest

PROVIDER_ENV = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "OPENAI_MODEL",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_MODEL",
    "LLAMA_CPP_URL",
    "LLAMA_API_KEY",
    "VLLM_URL",
    "VLLM_API_KEY",
    "VLLM_MODEL",
)


@pytest.fixture(autouse=True)
def _no_provider_env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's real keys and URLs never reach a test that uses the fake servers."""
    if request.node.get_closest_marker("e2e") is None:
        for name in PROVIDER_ENV:
            monkeypatch.delenv(name, raising=False)
