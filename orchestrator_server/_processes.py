"""``serve_processes``: ``orchestrator-server --workers N``. Private.

The parent binds the listening socket once and starts N server processes that share it
(the kernel spreads connections over them), as uvicorn's own ``--workers`` does. It passes
SIGTERM and SIGINT on to them (each drains), starts again one that dies on its own, and
exits 0 once all have stopped cleanly. Only a pipeline shared over Redis can run this way:
a request submitted to one process is answered by any.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import FrameType

__all__ = ["LISTEN_FD", "serve_processes"]

logger = logging.getLogger("orchestrator_server")

LISTEN_FD = "ORCHESTRATOR_LISTEN_FD"
"""The environment variable that hands a server process its inherited socket."""

_RESTART_PAUSE = 1.0  # seconds before starting again a process that died on its own


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve_processes(argv: list[str], processes: int, host: str, port: int) -> int:
    """Run ``processes`` copies of ``orchestrator-server argv`` on one socket.

    Returns:
        0 once every process stopped cleanly after a signal; else the first failure's code.
    """
    sock = _bind(host, port)
    stopping = threading.Event()
    children: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, LISTEN_FD: str(sock.fileno())}
    command = [sys.executable, "-m", "orchestrator_server", *argv, "--workers", "1"]

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(command, env=env, pass_fds=(sock.fileno(),))

    def forward(signum: int, frame: FrameType | None) -> None:
        stopping.set()
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        children.extend(start() for _ in range(processes))
        logger.info("serving on http://%s:%d with %d processes", host, port, processes)
        while children:
            for child in list(children):
                code = child.poll()
                if code is None:
                    continue
                children.remove(child)
                if stopping.is_set():
                    status = status or code
                else:  # died on its own: its requests live on in Redis; start another
                    logger.error(
                        "server process %d exited with %s; starting another", child.pid, code
                    )
                    time.sleep(_RESTART_PAUSE)
                    children.append(start())
            stopping.wait(0.2)  # a poll of the children, not a synchronisation
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    return status


def inherited_socket() -> socket.socket | None:
    """The socket a parent handed this process (``LISTEN_FD``), if any."""
    fd = os.environ.get(LISTEN_FD)
    if not fd:
        return None
    return socket.socket(fileno=int(fd))
