"""``orchestrator-server``: settings that cannot work are one line on stderr and exit 2,
before anything is served."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from orchestrator_server import __main__ as cli

if TYPE_CHECKING:
    from orchestrator_server.config import ServerConfig

pytestmark = pytest.mark.usefixtures("worker_env")


@pytest.fixture(autouse=True)
def _never_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    def run_server(config: ServerConfig) -> None:
        raise AssertionError(f"the server started on port {config.port}")

    monkeypatch.setattr(cli, "run_server", run_server)


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """What ``orchestrator-server argv...`` printed, having exited 2 with one line."""
    assert cli.main(["--host", "0.0.0.0", "--port", "8080", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("orchestrator-server: ")
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    "url", ["http://user:hunter2@127.0.0.1:9/v1", "http://user:hun/ter2@127.0.0.1:9/v1"]
)
def test_a_password_in_openai_base_url_is_one_redacted_line(
    worker_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    worker_env.setenv("OPENAI_BASE_URL", url)
    err = refused(capsys, "--worker", "openai")
    assert "'http://user:***@127.0.0.1:9/v1'" in err
    assert "OPENAI_API_KEY" in err
    assert "hun" not in err


def test_llama_cpp_without_its_url_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    err = refused(capsys, "--worker", "llama_cpp")
    assert "LLAMA_CPP_URL is not set" in err
    assert "LLAMA_CPP_URL=http://127.0.0.1:8081" in err


def test_a_worker_url_at_the_servers_own_port_is_one_line(
    worker_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    worker_env.setenv("LLAMA_CPP_URL", "http://localhost:9001")
    worker_env.setenv("SERVER_PORT", "9001")  # the port the server takes, not its default
    assert cli.main(["--worker", "llama_cpp"]) == 2
    _, err = capsys.readouterr()
    assert err == (
        "orchestrator-server: worker 'llama_cpp': LLAMA_CPP_URL points at this server "
        "itself (localhost:9001): set LLAMA_CPP_URL to the model server's URL, or serve on "
        "another --port\n"
    )
