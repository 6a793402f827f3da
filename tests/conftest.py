from __future__ import annotations

import pytest

pytest_plugins = ["tests.redis_server"]


@pytest.fixture
def anyio_backend() -> str:
    """redis.asyncio and aiolimiter are asyncio-only, and so is the pipeline."""
    return "asyncio"
