from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """redis.asyncio and aiolimiter are asyncio-only, and so is the pipeline."""
    return "asyncio"
