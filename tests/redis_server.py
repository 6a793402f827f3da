"""A throwaway ``redis-server`` for the tests: started once per session, killed at the end.

Registered in ``tests/conftest.py`` with ``pytest_plugins = ["tests.redis_server"]``.

- ``redis_server`` (session scope): a ``RedisServer`` on a free loopback port, with no
  persistence; ``server.stopped()`` stops it and starts it again on the same port, and
  ``server.frozen()`` suspends it (``SIGSTOP``: connections are accepted, nothing is
  answered) and resumes it, for outage tests.
- ``redis_url`` (session scope): its URL.

Without a ``redis-server`` binary on ``PATH`` the fixtures use ``$REDIS_URL`` (that server
cannot be stopped, so outage tests skip). With neither, Redis tests skip with the reason,
except under ``$CI``, where they fail: CI must not pass by skipping.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from typing import TYPE_CHECKING, final
from urllib.parse import urlsplit

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["RedisServer", "free_port", "redis_server", "redis_url", "wait_for_ping"]

START_TIMEOUT = 10.0
"""Seconds a starting server has to answer PING before we give up."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ping(host: str, port: int, *, timeout: float = 0.5) -> bool:
    """Whether a Redis server answers ``PING`` at ``host:port`` right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def wait_for_ping(
    host: str, port: int, *, deadline: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll ``PING`` until the server answers, the process exits, or ``deadline`` passes.

    Raises:
        RuntimeError: The process exited or the deadline (a ``time.monotonic()`` value)
            passed first.
    """
    pause = 0.005
    while not ping(host, port):
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {process.returncode}")
        if time.monotonic() >= deadline:
            raise RuntimeError(f"redis-server on port {port} did not answer PING in time")
        time.sleep(pause)  # a poll interval, not a synchronisation: PING decides
        pause = min(pause * 2, 0.1)


@final
class RedisServer:
    """A ``redis-server`` subprocess on a loopback port, or an external server by URL.

    Example:
        >>> server = RedisServer.start_local()  # doctest: +SKIP
        >>> with server.stopped():  # doctest: +SKIP
        ...     ...  # Redis is down here, back on the same port afterwards
        >>> with server.frozen():  # doctest: +SKIP
        ...     ...  # Redis accepts connections here but answers nothing
        >>> server.terminate()  # doctest: +SKIP
    """

    def __init__(self, url: str, *, binary: str | None = None, port: int | None = None) -> None:
        self.url = url
        self._binary = binary
        self._port = port
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    def start_local(cls, binary: str = "redis-server", *, attempts: int = 3) -> RedisServer:
        """Start ``binary`` on a free port and wait until it answers PING.

        A port found free can be taken before the server binds it, so a failed start is
        retried on a fresh port.

        Raises:
            RuntimeError: The server did not come up after ``attempts`` tries.
        """
        error: RuntimeError | None = None
        for _ in range(attempts):
            port = free_port()
            server = cls(f"redis://127.0.0.1:{port}/0", binary=binary, port=port)
            try:
                server.start()
            except RuntimeError as exc:
                error = exc
                continue
            return server
        raise RuntimeError(f"could not start {binary}: {error}")

    @property
    def can_restart(self) -> bool:
        """Whether this object runs the server (and can stop and start it)."""
        return self._binary is not None

    @property
    def running(self) -> bool:
        """Whether our subprocess is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the subprocess on our port and wait for PING (no-op when running).

        Raises:
            RuntimeError: It is an external server, or it did not answer in time.
        """
        if self._binary is None or self._port is None:
            raise RuntimeError("an external Redis server cannot be started by the tests")
        if self.running:
            return
        self._process = subprocess.Popen(
            [
                self._binary,
                "--port",
                str(self._port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_ping(
                "127.0.0.1",
                self._port,
                deadline=time.monotonic() + START_TIMEOUT,
                process=self._process,
            )
        except RuntimeError:
            self.terminate()
            raise

    def terminate(self) -> None:
        """Stop the subprocess and wait for it to exit (no-op when not running)."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """Stop the server for the ``with`` block, then start it again on the same port.

        Raises:
            RuntimeError: The server is external (tests should skip instead: see
                ``can_restart``).
        """
        if not self.can_restart:
            raise RuntimeError("an external Redis server cannot be stopped by the tests")
        self.terminate()
        try:
            yield
        finally:
            self.start()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Suspend the server (``SIGSTOP``) for the ``with`` block, then resume it (``SIGCONT``).

        A suspended server is the black hole of an outage: the kernel still completes TCP
        handshakes, but no command is answered, so every call waits for its timeout. Its
        data survives.

        Raises:
            RuntimeError: The server is external or not running (tests should skip instead:
                see ``can_restart``).
        """
        process = self._process
        if process is None or process.poll() is not None:
            raise RuntimeError("only a running redis-server of our own can be frozen")
        os.kill(process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(process.pid, signal.SIGCONT)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A Redis server for the whole session: our own subprocess, or ``$REDIS_URL``."""
    binary = shutil.which("redis-server")
    if binary is not None:
        server = RedisServer.start_local(binary)
        try:
            yield server
        finally:
            server.terminate()
        return
    url = os.environ.get("REDIS_URL")
    if url:
        parts = urlsplit(url)
        if not ping(parts.hostname or "localhost", parts.port or 6379, timeout=2.0):
            pytest.fail(f"REDIS_URL={url} does not answer PING")
        yield RedisServer(url)
        return
    reason = "Redis tests need a redis-server binary on PATH or REDIS_URL"
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    """The URL of the session's Redis server."""
    return redis_server.url
