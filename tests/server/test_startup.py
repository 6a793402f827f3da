"""Starting and stopping the server as a user does: the CLI and the demo as processes
(signals, exit status, the start line), settings that cannot work, a missing ``server``
extra, what the start line says, a Redis that is down, and the prompt a real worker gets.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import httpx
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from orchestrator.hooks import DEFAULT_TEMPLATE, default_retriever
from orchestrator_server import ServerConfig, create_app
from orchestrator_server import __main__ as cli
from orchestrator_server.app import build_pipeline_config, describe
from tests.server.conftest import serve_edge
from tests.workers.fake_servers import TOKENS, FakeOpenAi, FakeServer

if TYPE_CHECKING:
    from collections.abc import Iterator

    from anyio.abc import Process

CHECKOUT = Path(__file__).resolve().parents[2]
EXTRA = "pip install 'prompt-orchestrator[server]'"
SETTINGS_ENV = ("REDIS_URL", "RATE_LIMIT_REQUESTS", "RATE_LIMIT_WINDOW", "CORS_ORIGINS")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a server process: this checkout, none of the developer's
    server or provider settings."""
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS_ENV}
    for name in ("ORCHESTRATOR_WORKER", "SERVER_HOST", "SERVER_PORT"):
        env.pop(name, None)
    return {**env, "PYTHONPATH": str(CHECKOUT), **extra}


# -- the processes: start line, SIGINT and SIGTERM -------------------------------------------


async def read_until(stderr: BufferedByteReceiveStream, text: str, seen: list[str]) -> None:
    """Read stderr lines into ``seen`` until one contains ``text``."""
    while True:
        line = (await stderr.receive_until(b"\n", 1 << 16)).decode()
        seen.append(line)
        if text in line:
            return


async def rest_of(stderr: BufferedByteReceiveStream) -> str:
    return b"".join([chunk async for chunk in stderr]).decode()


@pytest.mark.parametrize(
    ("command", "sig", "times"),
    [
        pytest.param(["examples/web_api_demo.py"], signal.SIGINT, 1, id="demo-SIGINT"),
        pytest.param(["examples/web_api_demo.py"], signal.SIGTERM, 1, id="demo-SIGTERM"),
        pytest.param(["-m", "orchestrator_server"], signal.SIGINT, 1, id="cli-SIGINT"),
        # Ctrl-C again while it shuts down: uvicorn's force exit, quiet all the same.
        pytest.param(["examples/web_api_demo.py"], signal.SIGINT, 2, id="demo-SIGINT-twice"),
    ],
)
async def test_the_server_says_where_it_serves_and_a_signal_stops_it_with_status_0(
    command: list[str], sig: signal.Signals, times: int
) -> None:
    port = free_port()
    env = child_env(SERVER_PORT=str(port), SERVER_HOST="127.0.0.1")
    seen: list[str] = []
    process: Process
    async with await anyio.open_process(
        [sys.executable, *command], cwd=CHECKOUT, env=env, stdout=subprocess.DEVNULL
    ) as process:
        try:
            assert process.stderr is not None
            stderr = BufferedByteReceiveStream(process.stderr)
            with anyio.fail_after(20):
                await read_until(stderr, f"serving on http://127.0.0.1:{port} ", seen)
                # Logged before the socket is bound; uvicorn's own line comes once it is.
                await read_until(stderr, "Uvicorn running on", seen)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                health = await client.get("/health")
            assert health.status_code == 200
            process.send_signal(sig)
            if times == 2:
                with anyio.fail_after(20):
                    await read_until(stderr, "Shutting down", seen)
                process.send_signal(sig)
            with anyio.fail_after(20):
                seen.append(await rest_of(stderr))
                code = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
    log = "\n".join(seen)
    assert code == 0, log
    assert "Traceback" not in log


# -- settings that cannot work: one line, exit 2 ---------------------------------------------


@pytest.fixture
def cli_env(worker_env: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """``cli.main`` in this process, with a clean environment, never serving."""
    for name in SETTINGS_ENV:
        worker_env.delenv(name, raising=False)

    def run_server(config: ServerConfig) -> None:
        raise AssertionError(f"the server started with redis_url={config.redis_url!r}")

    worker_env.setattr(cli, "run_server", run_server)
    return worker_env


def refused(capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(["--host", "127.0.0.1", "--port", "8080"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("orchestrator-server: ")
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_a_redis_url_that_is_not_a_url_is_one_line(
    cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_env.setenv("REDIS_URL", "notaurl")
    err = refused(capsys)
    assert "REDIS_URL" in err
    assert "'notaurl'" in err


@pytest.mark.parametrize(
    "url",
    [
        "http://:s3cr3t@localhost:6379/0",  # not a Redis scheme
        "s3cr3t@localhost:6379",  # no scheme at all
        "redis://:s3cr3t@localhost:notaport/0",  # a port that is not a number
        "redis://user:s3cr3t@localhost:99999/0",  # a port out of range
        "redis://:s3cr/3t@localhost:6379/0",  # a '/' in the password, not %-encoded
        "redis://:s3cr#3t@localhost:6379/0",  # a '#' in the password
        "redis://user:s3cr3t@[::1/0",  # an IPv6 host left open
    ],
)
def test_a_malformed_redis_url_is_one_line_that_never_shows_its_password(
    cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    cli_env.setenv("REDIS_URL", url)
    err = refused(capsys)
    assert "REDIS_URL" in err
    assert "***" in err
    assert "s3cr" not in err
    assert "3t@" not in err


# -- without the server extra ----------------------------------------------------------------


def python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )


@pytest.mark.parametrize("missing", ["starlette", "uvicorn"])
def test_without_the_server_extra_the_cli_says_what_to_install(missing: str) -> None:
    # None in sys.modules makes `import <missing>` raise ModuleNotFoundError.
    done = python(
        f"import sys; sys.modules[{missing!r}] = None\n"
        "from orchestrator_server.__main__ import main; raise SystemExit(main([]))"
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert EXTRA in done.stderr
    assert missing in done.stderr


@pytest.mark.parametrize("missing", ["starlette", "uvicorn"])
def test_without_the_server_extra_importing_a_name_says_what_to_install(missing: str) -> None:
    done = python(
        f"import sys; sys.modules[{missing!r}] = None\n"
        "import orchestrator_server\n"  # the package itself imports
        "try:\n"
        "    from orchestrator_server import create_app\n"
        "except ModuleNotFoundError as exc:\n"
        "    print(type(exc).__name__, exc.name, exc)\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"ModuleNotFoundError {missing} ")
    assert EXTRA in done.stdout


# -- the start line ---------------------------------------------------------------------------


def test_the_start_line_names_address_worker_and_policies_and_hides_the_redis_password() -> None:
    config = ServerConfig(
        host="127.0.0.1",
        port=9000,
        redis_url="redis://default:s3cr3t@cache:6379/0",
        rate_limit_requests=5,
        rate_limit_window=30,
        dedup=False,
        drain_seconds=10,
        max_connections=50,
    )
    assert describe(config) == (
        "serving on http://127.0.0.1:9000 (worker echo, cache redis, rate limit 5 per 30s, "
        "dedup off; redis redis://default:***@cache:6379/0; timeout 300s, drain 10s, "
        "max connections 50)"
    )


def test_the_start_line_of_a_server_without_redis() -> None:
    line = describe(ServerConfig(port=8081, worker="openai", cache_entries=100))
    assert line.startswith("serving on http://0.0.0.0:8081 (worker openai, ")
    assert "cache memory, 100 entries, rate limit off, dedup on; redis none;" in line
    assert describe(ServerConfig(cache_entries=0)).count("cache off") == 1
    assert "a pipeline passed in" in describe(ServerConfig(), borrowed=True)


@pytest.fixture
def dead_redis_port() -> Iterator[int]:
    """A loopback port bound but not listening: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.anyio
async def test_a_redis_that_is_down_at_start_is_one_warning_and_the_server_starts_degraded(
    dead_redis_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"redis://:s3cr3t@127.0.0.1:{dead_redis_port}/0"
    config = ServerConfig(redis_url=url, rate_limit_requests=10)
    with caplog.at_level(logging.WARNING, logger="orchestrator_server"):
        async with AsyncExitStack() as stack:
            with anyio.fail_after(5):
                pipeline = await build_pipeline_config(config, stack)
            assert pipeline.cache is not None
            assert pipeline.cache.backend == "redis"
            assert pipeline.rate_limiter is not None
    [warning] = [r for r in caplog.records if r.name == "orchestrator_server"]
    assert warning.levelno == logging.WARNING
    message = warning.getMessage()
    assert f"127.0.0.1:{dead_redis_port}" in message
    assert "did not answer" in message
    assert "degraded" in message
    assert "s3cr3t" not in message


# -- the prompt a worker gets -----------------------------------------------------------------


@pytest.mark.anyio
async def test_only_the_echo_worker_gets_the_seeds_demo_prompt() -> None:
    async with AsyncExitStack() as stack:
        echo = await build_pipeline_config(ServerConfig(worker="echo"), stack)
        openai = await build_pipeline_config(ServerConfig(worker="openai"), stack)
    assert echo.retriever is default_retriever
    assert echo.template == DEFAULT_TEMPLATE
    assert openai.retriever is None
    assert openai.template == "{input}"


@pytest.mark.anyio
async def test_a_real_worker_gets_the_users_prompt_as_is(worker_env: pytest.MonkeyPatch) -> None:
    prompt = "What is the capital of France?"
    async with FakeServer(FakeOpenAi(api_key="sk-test")) as fake:
        worker_env.setenv("OPENAI_BASE_URL", f"{fake.url}/v1")
        worker_env.setenv("OPENAI_API_KEY", "sk-test")
        settings = ServerConfig(worker="openai", access_log=False)
        async with (
            serve_edge(create_app(config=settings), settings) as (base, _),
            httpx.AsyncClient(base_url=base) as client,
        ):
            submitted = await client.post("/api/v1/infer", json={"prompt": prompt})
            request_id = submitted.json()["request_id"]
            with anyio.fail_after(5):
                result = (await client.get(f"/api/v1/result/{request_id}")).json()
    assert result["status"] == "completed", result
    assert result["result"] == "".join(TOKENS)
    [call] = fake.requests
    assert json.loads(call.body)["messages"] == [{"role": "user", "content": prompt}]


async def test_start_server_freezes_what_lives_at_startup_before_it_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gc

    from orchestrator_server import app as app_module

    events: list[str] = []

    class Server:
        async def serve(self, sockets: object = None) -> None:
            events.append("serve")

    monkeypatch.setattr(gc, "freeze", lambda: events.append("freeze"))  # not this process's
    monkeypatch.setattr(app_module, "build_server", lambda app, settings: Server())
    await app_module.start_server(ServerConfig(access_log=False))
    assert events == ["freeze", "serve"]
