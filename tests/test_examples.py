"""The examples run as documented (those that need no key or external model server)."""

from __future__ import annotations

import os
import re
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


DOCS = EXAMPLES.parent / "docs"


@pytest.mark.parametrize(
    ("page", "block"),
    [("priority.md", 0), ("cache.md", -1), ("rate-limiting.md", -1)],
)
def test_doc_example_runs(page: str, block: int) -> None:
    """Self-contained examples in docs/ run as printed (defining ``main`` or at top level)."""
    code = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)[block]
    if "asyncio.run(" not in code:  # a page that defines main() and leaves running it to you
        code += "\nimport asyncio\nasyncio.run(main())\n"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(EXAMPLES.parent)},
    )
    assert done.returncode == 0, done.stderr
