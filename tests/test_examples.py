"""The examples run as documented (those that need no key or external model server).

The code blocks of README.md and docs/ are tested in tests/test_docs.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(EXAMPLES.parent), **env},  # this checkout
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("basic_pipeline.py", "completed: User Query: Question 3"),
        ("cache_demo.py", "hits=2"),
        ("rate_limit_demo.py", "another session is unaffected: True"),
        ("reliability_demo.py", "model calls: 1"),
    ],
)
def test_example_runs(name: str, expected: str) -> None:
    done = run_example(name)
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout
    assert "Traceback" not in done.stderr


def test_cache_demo_through_redis(redis_url: str) -> None:
    done = run_example("cache_demo.py", REDIS_URL=redis_url)
    assert done.returncode == 0, done.stderr
    assert "backend='redis'" in done.stdout
