"""Developer sessions: ``nox -s tests lint typecheck bench``."""

from __future__ import annotations

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
]


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Run the benchmarks (``nox -s bench -- bench/http_load.py`` runs just one)."""
    session.install("-e", ".[dev]")
    for script in session.posargs or BENCHMARKS:
        session.run("python", script)


@nox.session(python=PYTHON)
def e2e(session: nox.Session) -> None:
    """Opt-in: examples against a real local model (see docs/workers.md)."""
    session.install("-e", ".[dev]")
    session.run("pytest", "-m", "e2e", *session.posargs)
