"""Every code block in README.md and docs/*.md works as printed.

- A ```python block is a complete script: it runs in a process of its own, this checkout
  on ``PYTHONPATH``, and must exit 0 without a traceback. Nothing is appended to it (a
  block that defines ``main`` must call it itself).
- A ```python block whose first line is ``# fragment: <why>`` is a piece of a reader's own
  code: it must compile (top-level ``await`` allowed, as inside an async function) and its
  imports must resolve. Worker constructors shown in fragments must match the signatures.
- ```bash / ```sh blocks, the ``$`` lines of ```console blocks and the indented command
  lines of the examples' docstrings must pass ``bash -n``; ```json blocks must parse.

The scripts share one environment of loopback stand-ins, so that the examples needing a
model server or the web API run without leaving the machine: ``OPENAI_BASE_URL`` names a
fake OpenAI-compatible server (tests/workers/fake_servers.py) and ``SERVER_PORT`` an
orchestrator server (EchoWorker) that the web API's client examples talk to. All scripts
start at once, in parallel processes, and each test waits for its own.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import pytest
import uvicorn
from anyio.from_thread import start_blocking_portal

import orchestrator.workers
from orchestrator_server import ServerConfig, create_app
from tests.workers.fake_servers import FakeOpenAi, FakeServer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from starlette.applications import Starlette

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FRAGMENT = "# fragment: "
LANGUAGES = {"python", "bash", "sh", "console", "json", "text", ""}  # "": a diagram, output
FENCE = re.compile(r"^```(?P<lang>\S*)\n(?P<code>.*?)^```$", re.M | re.S)
TIMEOUT = 60  # seconds for each script, counted from the start of them all
SCRUBBED = ("OPENAI_", "ANTHROPIC_", "LLAMA_", "VLLM_", "REDIS_URL", "SERVER_", "RATE_LIMIT_")


class Block(NamedTuple):
    page: str
    line: int
    lang: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def fragment(self) -> bool:
        return self.code.startswith(FRAGMENT)


def blocks(*langs: str) -> list[Block]:
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            name = str(page.relative_to(ROOT))
            found.append(Block(name, line, match["lang"], match["code"]))
    return [b for b in found if not langs or b.lang in langs]


def params(selected: list[Block]) -> list[pytest.ParameterSet]:
    return [pytest.param(b, id=b.id) for b in selected]


SCRIPTS = [b for b in blocks("python") if not b.fragment]
FRAGMENTS = [b for b in blocks("python") if b.fragment]


def test_every_fence_is_found_and_has_a_known_language() -> None:
    """A block the regex missed, or a ```py block, would otherwise escape these tests."""
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        fences = [ln for ln in text.splitlines() if ln.lstrip().startswith("```")]
        name = str(page.relative_to(ROOT))
        assert len(fences) == 2 * len([b for b in blocks() if b.page == name]), name
    assert {b.lang for b in blocks()} <= LANGUAGES
    assert len(SCRIPTS) >= 15
    assert all(b.code.splitlines()[0].removeprefix(FRAGMENT).strip() for b in FRAGMENTS)


# --- the environment the scripts run in ------------------------------------------------


@asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[int]:
    """Serve ``app`` on a loopback port, listening before uvicorn starts (nothing to poll)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture(scope="module")
def doc_env() -> Iterator[dict[str, str]]:
    """The scripts' environment: this checkout, a fake model server, a running server."""
    app = create_app(config=ServerConfig(access_log=False))
    with (
        start_blocking_portal("asyncio") as portal,
        portal.wrap_async_context_manager(FakeServer(FakeOpenAi())) as fake,
        portal.wrap_async_context_manager(serving(app)) as port,
    ):
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(SCRUBBED) and not k.lower().endswith("_proxy")  # loopback only
        }
        env.update(
            PYTHONPATH=str(ROOT),
            PYTHONIOENCODING="utf-8",
            OPENAI_BASE_URL=f"{fake.url}/v1",
            SERVER_PORT=str(port),
        )
        yield env


@pytest.fixture(scope="module")
def launched(
    doc_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[Block, tuple[subprocess.Popen[bytes], Path]]]:
    """Every script, started at once (output to files: a full pipe would stall one)."""
    out = tmp_path_factory.mktemp("doc_scripts")
    running: dict[Block, tuple[subprocess.Popen[bytes], Path]] = {}
    try:
        for block in SCRIPTS:
            path = out / (re.sub(r"\W", "_", block.id) + ".py")  # docs_cache_md_106.py
            path.write_text(block.code, encoding="utf-8")
            stdout_path, stderr_path = path.with_suffix(".out"), path.with_suffix(".err")
            with stdout_path.open("wb") as stdout, stderr_path.open("wb") as err:
                running[block] = (
                    subprocess.Popen(
                        [sys.executable, str(path)],
                        cwd=ROOT,
                        env=doc_env,
                        stdout=stdout,
                        stderr=err,
                    ),
                    path,
                )
        yield running
    finally:
        for process, _ in running.values():
            if process.poll() is None:
                process.kill()
            process.wait()


# --- the checks ------------------------------------------------------------------------


@pytest.mark.parametrize("block", params(SCRIPTS))
def test_script_runs_as_printed(
    block: Block, launched: dict[Block, tuple[subprocess.Popen[bytes], Path]]
) -> None:
    process, path = launched[block]
    try:
        code = process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.id} still running after {TIMEOUT}s")
    stdout = path.with_suffix(".out").read_text(encoding="utf-8")
    stderr = path.with_suffix(".err").read_text(encoding="utf-8")
    assert code == 0, f"{block.id} exited {code}:\n{stdout}\n{stderr}"
    assert "Traceback" not in stderr, stderr


@pytest.mark.parametrize("block", params(SCRIPTS))
def test_script_calls_the_main_it_defines(block: Block) -> None:
    """Defining ``main`` and never running it exits 0 too, having shown nothing."""
    tree = ast.parse(block.code)
    functions = [s for s in tree.body if isinstance(s, ast.FunctionDef | ast.AsyncFunctionDef)]
    called = {
        node.func.id
        for stmt in tree.body
        if stmt not in functions
        for node in ast.walk(stmt)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert "main" in called or "main" not in {f.name for f in functions}


@pytest.mark.parametrize("block", params(FRAGMENTS))
def test_fragment_compiles_and_its_imports_resolve(block: Block) -> None:
    tree = compile(
        block.code, block.id, "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    )
    compile(tree, block.id, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom):
            assert node.module is not None
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module}.{alias.name}"


NOT_LITERAL = object()


def literal(node: ast.expr) -> object:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return NOT_LITERAL


def worker_calls(block: Block) -> Iterator[tuple[type[object], dict[str, object]]]:
    """Each call of a public worker class in ``block``, with its keywords' values."""
    tree = ast.parse(block.code)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            cls = getattr(orchestrator.workers, node.func.id, None)
            if node.func.id in orchestrator.workers.__all__ and isinstance(cls, type):
                yield cls, {kw.arg or "**": literal(kw.value) for kw in node.keywords}


@pytest.mark.parametrize("block", params([b for b in FRAGMENTS if any(worker_calls(b))]))
def test_worker_constructor_in_fragment_matches_the_signature(block: Block) -> None:
    """A fragment that lists a constructor's arguments lists all of them, with the defaults."""
    for cls, given in worker_calls(block):
        signature = inspect.signature(cls)
        signature.bind(**given)  # TypeError for a name the class does not take
        body = ast.parse(block.code).body
        if len(body) == 1 and isinstance(body[0], ast.Expr):  # the whole signature, listed
            assert list(given) == list(signature.parameters)
            for name, parameter in signature.parameters.items():
                if parameter.default is not inspect.Parameter.empty:
                    assert given[name] == parameter.default, name


def bash_syntax(code: str) -> subprocess.CompletedProcess[str]:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash on PATH")
    return subprocess.run(
        [bash, "-n"], input=code, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def console_commands(code: str) -> str:
    """The commands of a transcript: ``$ `` lines and their ``\\`` continuations."""
    commands: list[str] = []
    continued = False
    for line in code.splitlines():
        if line.startswith("$ ") or continued:
            commands.append(line.removeprefix("$ "))
            continued = line.endswith("\\")
    return "\n".join(commands) + "\n"


def example_commands() -> list[pytest.ParameterSet]:
    """The indented command lines in each example's docstring."""
    found = []
    for path in sorted((ROOT / "examples").glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        lines = [ln.removeprefix("    ") for ln in doc.splitlines() if ln.startswith("    ")]
        if lines:
            found.append(pytest.param("\n".join(lines) + "\n", id=f"examples/{path.name}"))
    return found


@pytest.mark.parametrize("block", params(blocks("bash", "sh")))
def test_shell_block_is_valid_shell(block: Block) -> None:
    checked = bash_syntax(block.code)
    assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize("block", params(blocks("console")))
def test_console_commands_are_valid_shell(block: Block) -> None:
    commands = console_commands(block.code)
    assert commands.strip()
    checked = bash_syntax(commands)
    assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize("commands", example_commands())
def test_example_docstring_commands_are_valid_shell(commands: str) -> None:
    checked = bash_syntax(commands)
    assert checked.returncode == 0, checked.stderr


def test_bash_n_rejects_the_old_readme_line() -> None:
    """The check can fail: the README's former placeholder is a syntax error."""
    checked = bash_syntax("curl -s localhost:8080/api/v1/result/<request_id>\n")
    assert checked.returncode != 0


@pytest.mark.parametrize("block", params(blocks("json")))
def test_json_block_parses(block: Block) -> None:
    json.loads(block.code)
