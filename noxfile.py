"""Developer sessions: ``nox -s tests lint typecheck bench``."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.default_venv_backend = "venv"

PYTHON = ["3.11"]


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite (pass pytest arguments after --)."""
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the packages, tests, examples, benchmarks and this file."""
    session.install("-e", ".[dev]")
    session.run("mypy")


BENCHMARKS = [
    "bench/pipeline_throughput.py",
    "bench/enhanced_primitives.py",
    "bench/reliability_primitives.py",
    "bench/http_load.py",  # needs wrk (apt-get install wrk)
    "bench/stream_load.py",  # needs wrk
    "bench/roundtrip_load.py",  # needs wrk
]


@nox.session(python=PYTHON)
def soak(session: nox.Session) -> None:
    """Memory at scale and over a 10-minute run (``nox -s soak -- --minutes 1`` for less)."""
    session.install("-e", ".[dev]")
    session.run("python", "bench/soak.py", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Run the benchmarks (``nox -s bench -- bench/http_load.py`` runs just one)."""
    session.install("-e", ".[dev]")
    for script in session.posargs or BENCHMARKS:
        session.run("python", script)


REAL_LLM = Path(__file__).resolve().parent.parent / "shared" / "tools" / "start_real_llm.sh"


@nox.session(python=PYTHON)
def e2e(session: nox.Session) -> None:
    """Opt-in: the workers, pipeline and server against a real local model.

    Uses ``LLM_URL`` and ``LLM_MODEL_ID`` when set; otherwise starts SmolLM2 with
    ``start_real_llm.sh`` (``REAL_LLM_SCRIPT`` to point elsewhere; the first run compiles
    llama.cpp, about 10 minutes) and stops it afterwards.
    """
    session.install("-e", ".[dev]")
    env = {k: os.environ[k] for k in ("LLM_URL", "LLM_MODEL_ID") if k in os.environ}
    started: str | None = None
    if len(env) < 2:
        script = os.environ.get("REAL_LLM_SCRIPT", str(REAL_LLM))
        if not Path(script).exists():
            session.error(f"set LLM_URL and LLM_MODEL_ID, or REAL_LLM_SCRIPT ({script} is missing)")
        out = session.run(
            "bash", script, "/tmp/llmvenv", env={"LLM_MODEL": "smollm2"}, silent=True, external=True
        )
        printed = dict(
            line.split("=", 1) for line in str(out).splitlines() if line.startswith("LLM_")
        )
        env = {"LLM_URL": printed["LLM_URL"], "LLM_MODEL_ID": printed["LLM_MODEL_ID"]}
        started = printed.get("LLM_PID")
    url, model = env["LLM_URL"], env["LLM_MODEL_ID"]
    env |= {  # the examples' own settings, pointed at the same server
        "OPENAI_BASE_URL": f"{url}/v1",
        "OPENAI_MODEL": model,
        "VLLM_URL": url,
        "VLLM_MODEL": model,
    }
    try:
        session.run("pytest", "-m", "e2e", *session.posargs, env=env)
    finally:
        if started:
            os.kill(int(started), signal.SIGTERM)
