"""The server's worker factory: settings from the environment, and no worker that would
call the server itself."""

from __future__ import annotations

import pytest

from orchestrator.workers import LlamaCppWorker, OpenAiWorker, VllmWorker
from orchestrator_server.workers import make_worker

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("worker_env")]

ANYWHERE = ("0.0.0.0", 8080)  # the server's defaults


def test_llama_cpp_needs_its_url_as_the_default_is_the_servers_own() -> None:
    with pytest.raises(ValueError, match="LLAMA_CPP_URL is not set") as caught:
        make_worker("llama_cpp")
    assert "LLAMA_CPP_URL=http://127.0.0.1:8081" in str(caught.value)


async def test_llama_cpp_uses_its_url(worker_env: pytest.MonkeyPatch) -> None:
    worker_env.setenv("LLAMA_CPP_URL", "http://127.0.0.1:8081")
    worker = make_worker("llama_cpp", server_address=ANYWHERE)
    assert isinstance(worker, LlamaCppWorker)
    await worker.aclose()
    assert "'http://127.0.0.1:8081'" in repr(worker)


@pytest.mark.parametrize(
    ("worker", "variable", "url", "server_address"),
    [
        ("llama_cpp", "LLAMA_CPP_URL", "http://localhost:8080", ANYWHERE),
        ("llama_cpp", "LLAMA_CPP_URL", "http://127.0.0.1:8080/", ("127.0.0.1", 8080)),
        ("openai", "OPENAI_BASE_URL", "http://0.0.0.0:9000/v1", ("localhost", 9000)),
        ("openai", "OPENAI_BASE_URL", "http://192.0.2.7:9000/v1", ("192.0.2.7", 9000)),
        ("anthropic", "ANTHROPIC_BASE_URL", "http://[::1]:8080", ("::", 8080)),
        ("anthropic", "ANTHROPIC_BASE_URL", "http://api.localhost", ("0.0.0.0", 80)),
        ("vllm", "VLLM_URL", "https://LOCALHOST", ("127.0.0.1", 443)),
        ("vllm", "VLLM_URL", "http://[::ffff:127.0.0.1]:8080", ANYWHERE),
        ("vllm", "VLLM_URL", "", ("0.0.0.0", 8000)),  # unset: vLLM's default, :8000
    ],
)
def test_a_url_pointing_at_the_server_itself_is_refused(
    worker_env: pytest.MonkeyPatch,
    worker: str,
    variable: str,
    url: str,
    server_address: tuple[str, int],
) -> None:
    worker_env.setenv(variable, url)
    worker_env.setenv("VLLM_MODEL", "qwen")
    with pytest.raises(ValueError, match="points at this server itself") as caught:
        make_worker(worker, server_address=server_address)
    assert str(caught.value).startswith(variable)


@pytest.mark.parametrize(
    ("url", "server_address"),
    [
        ("http://localhost:8081", ANYWHERE),  # another port
        ("http://localhost", ANYWHERE),  # :80
        ("http://localhost:8080", ("192.0.2.7", 8080)),  # the server is not on loopback
        ("http://192.0.2.8:8080", ANYWHERE),
        ("http://localhost:8080", ("0.0.0.0", 0)),  # port 0: not known yet
    ],
)
async def test_a_url_elsewhere_is_accepted(
    worker_env: pytest.MonkeyPatch, url: str, server_address: tuple[str, int]
) -> None:
    worker_env.setenv("LLAMA_CPP_URL", url)
    worker = make_worker("llama_cpp", server_address=server_address)
    assert isinstance(worker, LlamaCppWorker)
    await worker.aclose()


async def test_without_the_servers_address_nothing_is_compared(
    worker_env: pytest.MonkeyPatch,
) -> None:
    """``make_worker(name)`` as before: an app run by uvicorn may listen anywhere."""
    worker_env.setenv("OPENAI_BASE_URL", "http://localhost:8080/v1")
    worker = make_worker("openai")
    assert isinstance(worker, OpenAiWorker)
    await worker.aclose()


async def test_remote_defaults_are_never_the_server(worker_env: pytest.MonkeyPatch) -> None:
    worker_env.setenv("OPENAI_API_KEY", "sk-test")
    worker_env.setenv("VLLM_MODEL", "qwen")
    openai = make_worker("openai", server_address=("0.0.0.0", 443))
    assert isinstance(openai, OpenAiWorker)
    await openai.aclose()
    vllm = make_worker("vllm", server_address=ANYWHERE)  # localhost:8000
    assert isinstance(vllm, VllmWorker)
    await vllm.aclose()


def test_a_password_in_the_url_is_refused_unseen(worker_env: pytest.MonkeyPatch) -> None:
    worker_env.setenv("LLAMA_CPP_URL", "http://user:hunter2@localhost:8080")
    with pytest.raises(ValueError, match="points at this server itself") as caught:
        make_worker("llama_cpp", server_address=ANYWHERE)
    assert "hunter2" not in str(caught.value)
    worker_env.setenv("LLAMA_CPP_URL", "http://user:hunter2@localhost:8081")
    with pytest.raises(ValueError, match="user name or password") as caught:
        make_worker("llama_cpp", server_address=ANYWHERE)
    assert "hunter2" not in str(caught.value)
