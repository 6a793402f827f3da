"""The worker examples: against the fake servers, without settings, and (``-m e2e``) for real."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import anyio
import pytest

from tests.workers.fake_servers import (
    TOKENS,
    Fake,
    FakeAnthropic,
    FakeLlamaCpp,
    FakeOpenAi,
    FakeServer,
    anthropic_error,
)

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).parents[2]
EXAMPLES = ROOT / "examples"
KEY = "sk-example-test-key-a3f5e1"


async def run_example(name: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run ``examples/<name>`` with ``env``, importing this checkout's ``orchestrator``;
    its exit code, stdout and stderr."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONPATH": path, **env}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / name),
        env=full_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    with anyio.fail_after(60):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


# (example, its fake, the environment pointing it at the fake's URL, the variables it needs)
CASES = [
    ("openai_worker.py", FakeOpenAi, {"OPENAI_BASE_URL": "{url}/v1"}, "OPENAI_API_KEY"),
    ("anthropic_worker.py", FakeAnthropic, {"ANTHROPIC_BASE_URL": "{url}"}, "ANTHROPIC_API_KEY"),
    ("llama_cpp_worker.py", FakeLlamaCpp, {"LLAMA_CPP_URL": "{url}"}, "LLAMA_CPP_URL"),
    (
        "vllm_worker.py",
        FakeOpenAi,
        {"VLLM_URL": "{url}", "VLLM_MODEL": "qwen"},
        "VLLM_URL and VLLM_MODEL",
    ),
]
IDS = [case[0] for case in CASES]


@pytest.mark.parametrize(("example", "fake", "env", "needs"), CASES, ids=IDS)
async def test_example_streams_an_answer_from_the_fake(
    example: str, fake: type[Fake], env: dict[str, str], needs: str
) -> None:
    async with FakeServer(fake()) as server:
        settings = {k: v.format(url=server.url) for k, v in env.items()}
        code, out, err = await run_example(example, settings)
    assert code == 0, err
    assert out.endswith("".join(TOKENS) + "\n")
    assert "[usage: TokenUsage(prompt_tokens=9, completion_tokens=5)]" in err
    assert len(server.requests) == 1
    assert server.requests[0].json()["stream"] is True


@pytest.mark.parametrize(("example", "fake", "env", "needs"), CASES, ids=IDS)
async def test_example_without_settings_says_what_is_missing(
    example: str, fake: type[Fake], env: dict[str, str], needs: str
) -> None:
    code, _, err = await run_example(example, {})
    assert code == 2
    assert err.startswith(f"{needs} not set" if " and " in needs else f"{needs} is not set")
    assert "Traceback" not in err


async def test_example_reports_a_provider_error_without_a_traceback() -> None:
    body = anthropic_error("authentication_error", "invalid x-api-key")
    async with FakeServer(FakeAnthropic(fail=(401, body, {}))) as server:
        settings = {"ANTHROPIC_BASE_URL": server.url, "ANTHROPIC_API_KEY": KEY}
        code, out, err = await run_example("anthropic_worker.py", settings)
    assert code == 1
    assert "error: anthropic: HTTP 401 Unauthorized" in err
    assert "(retryable=False, retry_after=None)" in err
    assert "Traceback" not in err
    assert KEY not in out + err


async def test_example_reports_a_bad_url_without_a_traceback() -> None:
    code, _, err = await run_example("llama_cpp_worker.py", {"LLAMA_CPP_URL": "localhost:8080"})
    assert code == 2
    assert err.startswith("bad setting: the URL must start with http://")


@pytest.mark.e2e
@pytest.mark.parametrize("example", IDS)
async def test_example_against_a_real_server(example: str) -> None:
    """With the environment naming a real server (see docs/workers.md): ``-m e2e``."""
    code, out, err = await run_example(example, {})
    if code == 2:
        pytest.skip(err.strip())
    assert code == 0, err
    assert out.strip()
