"""Real server and worker processes for the distributed tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, final

import anyio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping

ROOT = Path(__file__).resolve().parent.parent.parent
SLOW = "tests.distributed.slow_worker:factory"


@final
class Process:
    """A child process whose stderr is read line by line (kept in ``lines``)."""

    def __init__(self, process: asyncio.subprocess.Process, name: str) -> None:
        self.process = process
        self.name = name
        self.lines: list[str] = []
        self._seen = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        stream = self.process.stderr
        assert stream is not None
        while line := await stream.readline():
            self.lines.append(line.decode(errors="replace"))
            self._seen.set()

    async def wait_for(self, text: str, timeout: float = 20) -> None:
        """Wait until a line of stderr contains ``text``."""
        with anyio.fail_after(timeout):
            while not any(text in line for line in self.lines):
                if self.process.returncode is not None:
                    raise AssertionError(f"{self.name} exited: {''.join(self.lines)[-2000:]}")
                self._seen.clear()
                await self._seen.wait()

    def send(self, sig: int) -> None:
        if self.process.returncode is None:
            self.process.send_signal(sig)

    async def stopped(self, timeout: float = 20) -> int:
        """The exit status, once the process has exited."""
        with anyio.fail_after(timeout):
            code = await self.process.wait()
        await self._reader
        return code

    @property
    def log(self) -> str:
        return "".join(self.lines)


async def start(name: str, args: list[str], env: Mapping[str, str], ready: str) -> Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )
    child = Process(process, name)
    await child.wait_for(ready)
    return child


@contextlib.asynccontextmanager
async def running(processes: list[Process]) -> AsyncIterator[list[Process]]:
    """Kill whatever is still running when the block ends (a failed test leaks nothing)."""
    try:
        yield processes
    finally:
        for child in processes:
            child.send(signal.SIGKILL)
        for child in processes:
            with contextlib.suppress(Exception):
                await child.stopped(10)


async def frontend(url: str, port: int, env: Mapping[str, str]) -> Process:
    args = ["-m", "orchestrator_server", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--redis-url", url, "--role", "frontend", "--log-level", "info"]
    return await start(f"frontend:{port}", args, env, "Uvicorn running on")


async def worker(
    url: str, env: Mapping[str, str], *, concurrency: int = 8, drain: float = 10
) -> Process:
    args = ["-m", "orchestrator.distributed", "--worker", SLOW, "--redis-url", url]
    args += ["--max-concurrency", str(concurrency), "--drain-seconds", str(drain)]
    return await start("worker", args, env, "taking requests from")
