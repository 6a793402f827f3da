from __future__ import annotations

import pytest

pytest_plugins = ["tests.redis_server"]


@pytest.fixture
def anyio_backend() -> str:
    """redis.asyncio and aiolimiter are asyncio-only, and so is the pipeline."""
    return "asyncio"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``e2e`` tests run only when asked for with ``-m e2e``: a plain run never leaves
    the machine, whatever keys the environment holds."""
    if "e2e" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="talks to a real model server: run with -m e2e")
    for item in items:
        if item.get_closest_marker("e2e") is not None:
            item.add_marker(skip)
