"""Starting and stopping the server as a user does: the CLI and the demo as processes
(signals, exit status, the start line), settings that cannot work, a missing ``server``
extra, what the start line says, a Redis that is down, and the prompt a real worker gets.
"""

from __future__ import annotations

import pytest

from orchestrator_server import ServerConfig
from orchestrator_server import __main__ as cli

SETTINGS_ENV = ("REDIS_URL", "RATE_LIMIT_REQUESTS", "RATE_LIMIT_WINDOW", "CORS_ORIGINS")


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
