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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``e2e`` tests run only when asked for with ``-m e2e``: a plain run never leaves
    the machine, whatever keys the environment holds."""
    if "e2e" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="talks to a real model server: run with -m e2e")
    for item in items:
        if item.get_closest_marker("e2e") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_provider_env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's real keys and URLs never reach a test that uses the fake servers."""
    if request.node.get_closest_marker("e2e") is None:
        for name in PROVIDER_ENV:
            monkeypatch.delenv(name, raising=False)
