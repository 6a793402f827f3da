"""``POST /api/v1/infer`` throughput and latency: the example server versus a bare app.

The example server runs with its policies (memory response cache, dedup, and a rate limiter
set too high to refuse) but without its access log (the bare app has none), then without its
policies, then with the access log. Every request carries a new
prompt, so every request misses the cache: the pessimistic case. Only 200 answers count
(wrk counts a shed 503 as a request). Each runs as one uvicorn process (the same loop and
HTTP parser), one after the other, several interleaved rounds, loaded by ``wrk`` (Debian's
``wrk`` package) with the same POST bodies. On a machine with two cores or more the server is
pinned to core 0 and ``wrk`` to core 1 (``taskset``): unpinned runs on two cores swing by
half. The bare app is Starlette parsing the JSON and answering the same shape: the floor for
one request through uvicorn and Starlette.

    python bench/http_load.py [--duration 5] [--connections 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

BODY = {"prompt": "What is the capital of France?", "session_id": "bench", "metadata": {}}

SERVER = """
import asyncio, contextlib, logging, os, sys
from orchestrator import EchoWorker, spawn_pipeline
from orchestrator_server import ServerConfig, start_server
from orchestrator_server._loop import run
from orchestrator_server.app import build_pipeline_config

logging.basicConfig(level=logging.INFO, stream=sys.stderr)  # as the example server does

async def main() -> None:
    access_log = os.environ.get("BENCH_ACCESS_LOG") == "1"
    port = int(sys.argv[1])
    redis_url = os.environ.get("BENCH_REDIS_URL")
    if redis_url:  # the policies in Redis: the response cache and the rate limiter
        config = ServerConfig(
            host="127.0.0.1", port=port, access_log=False, rate_limit_requests=10**9,
            redis_url=redis_url,
        )
    elif os.environ.get("BENCH_POLICIES") == "0":  # no response cache, no dedup, no limiter
        config = ServerConfig(
            host="127.0.0.1", port=port, access_log=access_log, cache_entries=0, dedup=False
        )
    else:  # the example's defaults, plus a rate limiter set too high to refuse
        config = ServerConfig(
            host="127.0.0.1", port=port, access_log=access_log, rate_limit_requests=10**9
        )
    async with contextlib.AsyncExitStack() as stack:  # the example's policies, zero-delay echo
        pipeline = await build_pipeline_config(config, stack)
        async with spawn_pipeline(EchoWorker.with_delay(0), pipeline) as handles:
            await start_server(config, handles)

run(main())  # uvloop, as the CLI and the example server
"""

BARE = """
import json, sys, uuid
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

async def infer(request: Request) -> JSONResponse:
    body = json.loads(await request.body())
    return JSONResponse({"request_id": str(uuid.uuid4()), "status": "pending",
                         "result": None, "error": None if body["prompt"] else "empty"})

app = Starlette(routes=[Route("/api/v1/infer", infer, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=False, log_level="warning")
"""

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = 0
request = function()  -- a new prompt each time: every request misses the cache
  n = n + 1
  return wrk.format(nil, nil, nil, string.format('%s', n))
end
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # another process: polling is the only signal
        if process.poll() is not None:
            raise RuntimeError("server exited during startup")
        try:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/api/v1/infer",
                data=json.dumps(BODY).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def parse_wrk(output: str) -> dict[str, float]:
    def latency_ms(label: str) -> float:
        match = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
        if not match:
            return float("nan")
        value, unit = float(match.group(1)), match.group(2)
        return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    total = re.search(r"(\d+) requests in ([\d.]+)(ms|s)", output)
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    failed = float(errors.group(1)) if errors else 0.0
    rps = float("nan")
    if total:
        seconds = float(total.group(2)) / (1000 if total.group(3) == "ms" else 1)
        rps = (int(total.group(1)) - failed) / seconds  # answered 200: shed 503s excluded
    return {
        "requests": float(total.group(1)) if total else float("nan"),
        "rps": rps,
        "p50_ms": latency_ms("50"),
        "p99_ms": latency_ms("99"),
        "non_2xx": failed,
    }


def pin(core: int, args: argparse.Namespace) -> list[str]:
    """``taskset -c CORE`` when pinning is on, else nothing."""
    return ["taskset", "-c", str(core)] if args.pin else []


def arguments(description: str, *, duration: int = 5) -> argparse.ArgumentParser:
    """The options every load script takes: ``--duration``, ``--connections``,
    ``--rounds``, ``--no-pin``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--duration", type=int, default=duration)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--no-pin", dest="pin", action="store_false", help="do not pin servers and clients"
    )
    return parser


def parse(parser: argparse.ArgumentParser, script: str) -> argparse.Namespace:
    """Parse, turn pinning off where it cannot be done, and insist on ``wrk``."""
    args = parser.parse_args()
    args.pin = args.pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    if shutil.which("wrk") is None:
        sys.exit(f"{script} needs wrk: apt-get install -y wrk")
    return args


@contextlib.contextmanager
def serving(
    source: str,
    args: argparse.Namespace,
    env: dict[str, str] | None = None,
    ready: Callable[[int, subprocess.Popen[bytes]], None] = wait_ready,
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Run the server script ``source`` on a free port, pinned to core 0, until exit;
    yields the process and its port once ``ready`` says it serves."""
    port = free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(source)
    process = subprocess.Popen(
        [*pin(0, args), sys.executable, script.name, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    try:
        ready(port, process)
        yield process, port
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        os.unlink(script.name)


def wrk(
    args: argparse.Namespace, port: int, lua: Path | str, *, connections: int | None = None
) -> str:
    """``wrk`` (pinned to core 1) against the port's infer route; its output."""
    command = [
        *pin(1, args),
        "wrk",
        f"-t{getattr(args, 'threads', 1)}",
        f"-c{connections or args.connections}",
        f"-d{args.duration}s",
        "--latency",
        "-s",
        str(lua),
        f"http://127.0.0.1:{port}/api/v1/infer",
    ]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


class ThrowawayRedis:
    """A ``redis-server`` of our own on a free port (nothing kept), pinned beside wrk."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                *pin(1, args),
                "redis-server",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--bind",
                "127.0.0.1",
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while self.reads() is None:  # another process: polling is the only signal
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def reads(self) -> int | None:
        """Redis's ``total_reads_processed``: the reads of client input, one per round
        trip of a client (a pipeline arrives in one read)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"INFO stats\r\n")
                data = b""
                while b"total_reads_processed" not in data or not data.endswith(b"\r\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        except OSError:
            return None
        match = re.search(rb"total_reads_processed:(\d+)", data)
        return int(match.group(1)) if match else None

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def run(
    source: str, lua: Path, args: argparse.Namespace, env: dict[str, str] | None = None
) -> dict[str, float]:
    redis = ThrowawayRedis(args) if (env or {}).get("BENCH_REDIS_URL") == "throwaway" else None
    if redis is not None:
        env = {**(env or {}), "BENCH_REDIS_URL": redis.url}
    try:
        result = _run(source, lua, args, env, redis)
    finally:
        if redis is not None:
            redis.close()
    return result


def _run(
    source: str,
    lua: Path,
    args: argparse.Namespace,
    env: dict[str, str] | None,
    redis: ThrowawayRedis | None,
) -> dict[str, float]:
    with serving(source, args, env) as (_, port):
        before = redis.reads() if redis is not None else None
        result = parse_wrk(wrk(args, port, lua))
        if redis is not None and before is not None:
            after = redis.reads()
            assert after is not None
            result["redis_reads_per_request"] = (after - before - 1) / result["requests"]
        return result


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--redis", action="store_true", help="also the server with its policies in Redis"
    )
    args = parse(parser, "bench/http_load.py")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        body = json.dumps({**BODY, "prompt": f"{BODY['prompt']} #%d"}).replace("'", "\\'")
        lua.write(LUA % body)
    variants: dict[str, tuple[str, dict[str, str]]] = {
        "bare": (BARE, {}),
        "server": (SERVER, {}),
        "plain": (SERVER, {"BENCH_POLICIES": "0"}),
        "logged": (SERVER, {"BENCH_ACCESS_LOG": "1"}),
    }
    if args.redis:
        if shutil.which("redis-server") is None:
            sys.exit("--redis needs redis-server: apt-get install -y redis-server")
        variants["redis"] = (SERVER, {"BENCH_REDIS_URL": "throwaway"})
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    try:
        for _ in range(args.rounds):
            for name, (source, env) in variants.items():
                results[name].append(run(source, Path(lua.name), args, env))
    finally:
        os.unlink(lua.name)
    summary = {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for name, runs in results.items()
    }
    ratio = summary["server"]["rps"] / summary["bare"]["rps"]
    if args.json:
        print(json.dumps({**summary, "ratio": ratio}))
        return
    labels = (
        ("bare", "bare Starlette app"),
        ("server", "example server"),
        ("plain", "  no cache, no dedup"),
        ("logged", "  + access log"),
        ("redis", "  policies in Redis"),
    )
    for name, label in labels:
        if name not in summary:
            continue
        s = summary[name]
        runs = ", ".join(f"{r['rps']:,.0f}" for r in results[name])
        print(
            f"{label:<20}: {s['rps']:>8,.0f} req/s  p50 {s['p50_ms']:.2f} ms  "
            f"p99 {s['p99_ms']:.2f} ms  non-2xx {s['non_2xx']:.0f}  (runs: {runs})"
        )
    print(f"{'ratio':<20}: {ratio:.0%} of the bare app's rate (200 responses per second)")
    if "redis" in summary:
        redis = summary["redis"]
        print(
            f"{'Redis / memory':<20}: {redis['rps'] / summary['server']['rps']:.0%} of the "
            f"memory policies' rate; {redis['redis_reads_per_request']:.2f} Redis round "
            "trips per request (Redis's total_reads_processed)"
        )


if __name__ == "__main__":
    main()
