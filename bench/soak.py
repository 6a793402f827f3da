"""Memory at scale: RSS per queued request, per waiting long-poll, per idle WebSocket, and
RSS over a run of steady traffic.

1. **Queued requests**: an in-process pipeline whose worker never answers, capacities
   raised to hold them, 100,000 requests submitted; RSS before and after, per request.
2. **Long-polls**: the example server (its policies on) with a worker that never answers;
   10,000 clients each POST a request and then wait in ``GET /api/v1/result/{id}``; the
   server's RSS after the POSTs and after the GETs, per waiting long-poll.
3. **Idle WebSockets**: 5,000 sockets opened to ``/api/v1/stream`` on the same server and
   left idle; RSS before and after, per socket.
4. **Steady traffic**: the example server with a zero-delay echo worker under ``wrk
   -c16`` (every request a new prompt: the response cache fills to its bound and then
   evicts) for ``--minutes``; the server's RSS sampled every ``--every`` seconds.

RSS is the server process's ``VmRSS`` (Linux ``/proc``); the clients run in this process.

    python bench/soak.py [--minutes 10] [--queued 100000] [--polls 10000] [--sockets 5000]
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import argparse

from http_load import SERVER, parse, pin, serving

QUEUED = """
import asyncio, gc, json, sys
from orchestrator import PipelineConfig, PromptRequest, spawn_pipeline

class Never:  # a worker that never answers: everything stays queued
    name = "never"
    async def infer(self, prompt): await asyncio.Event().wait()
    async def stream(self, prompt):
        await asyncio.Event().wait()
        yield ""

def rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")

async def main(n: int) -> None:
    config = PipelineConfig(rag_capacity=n, assemble_capacity=n, inference_capacity=n,
                            request_timeout=3600)
    async with spawn_pipeline(Never(), config) as handles:
        await handles.submit(PromptRequest("warm", "warm up"))
        gc.collect()
        before = rss()
        tickets = [await handles.submit(PromptRequest(f"user-{i % 100}", f"question {i}"),
                                        wait=True)
                   for i in range(n)]
        for _ in range(10):  # let the stages move what they will into the queue
            await asyncio.sleep(0)
        gc.collect()
        after = rss()
        print(json.dumps({"before": before, "after": after, "queued": len(tickets)}))
        for ticket in tickets:
            ticket.cancel_nowait()

asyncio.run(main(int(sys.argv[1])))
"""

# The example server's script, with a worker that never answers (long-polls and sockets
# stay open) and room to queue what they submit.
HELD = (
    SERVER.replace(
        "EchoWorker.with_delay(0)",
        "EchoWorker.with_delay(3600)",
    )
    .replace(
        "pipeline = await build_pipeline_config(config, stack)",
        "pipeline = attrs.evolve(await build_pipeline_config(config, stack), rag_capacity=20000,"
        " assemble_capacity=20000, inference_capacity=20000)",
    )
    .replace("import asyncio,", "import attrs, asyncio,")
)
assert "with_delay(3600)" in HELD
assert "attrs.evolve" in HELD

STEADY_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil, string.format('{"prompt": "soak %d", "session_id": "s%d"}',
                                                 n, n % 1000))
end
"""


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


# -- clients ---------------------------------------------------------------------------------


async def _post(port: int, i: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"prompt": f"held {i}", "session_id": f"s{i % 1000}"}).encode()
    writer.write(
        b"POST /api/v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    answer = json.loads(await reader.readexactly(length))
    return reader, writer, answer["request_id"]


async def long_polls(pid: int, port: int, n: int) -> dict[str, float]:
    semaphore = asyncio.Semaphore(256)  # connect in waves: the listen backlog is finite

    async def one(i: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
        async with semaphore:
            return await _post(port, i)

    held = await asyncio.gather(*(one(i) for i in range(n)))
    await asyncio.sleep(2)  # the server settles (another process: nothing to wait on)
    after_posts = rss(pid)
    for _, writer, request_id in held:
        writer.write(
            f"GET /api/v1/result/{request_id}?timeout=3000 HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
    await asyncio.gather(*(writer.drain() for _, writer, _ in held))
    await asyncio.sleep(5)  # every GET read and waiting (the server reads them in turns)
    after_gets = rss(pid)
    for _, writer, _ in held:
        writer.close()
    return {"after_posts": after_posts, "after_gets": after_gets, "polls": n}


async def idle_sockets(pid: int, port: int, n: int) -> dict[str, float]:
    semaphore = asyncio.Semaphore(256)

    async def one() -> asyncio.StreamWriter:
        async with semaphore:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            key = base64.b64encode(os.urandom(16)).decode()
            writer.write(
                (
                    "GET /api/v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                    "Sec-WebSocket-Version: 13\r\n\r\n"
                ).encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                raise RuntimeError(f"no upgrade: {head[:40]!r}")
            return writer

    await asyncio.sleep(2)
    before = rss(pid)
    sockets = await asyncio.gather(*(one() for _ in range(n)))
    await asyncio.sleep(2)
    after = rss(pid)
    for writer in sockets:
        writer.close()
    return {"before": before, "after": after, "sockets": n}


# -- the runs --------------------------------------------------------------------------------


def queued(n: int) -> dict[str, float]:
    output = subprocess.run(
        [sys.executable, "-c", QUEUED, str(n)], capture_output=True, text=True, check=True
    ).stdout
    result: dict[str, float] = json.loads(output)
    return result


def steady(args: argparse.Namespace) -> list[tuple[float, int]]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write(STEADY_LUA)
    samples: list[tuple[float, int]] = []
    try:
        with serving(SERVER, args) as (process, port):
            samples = _sample_steady(args, process, port, lua.name)
    finally:
        os.unlink(lua.name)
    return samples


def _sample_steady(
    args: argparse.Namespace, process: subprocess.Popen[bytes], port: int, lua: str
) -> list[tuple[float, int]]:
    samples: list[tuple[float, int]] = []
    seconds = int(args.minutes * 60)
    wrk = subprocess.Popen(
        [
            *pin(1, args),
            "wrk",
            "-t1",
            "-c16",
            f"-d{seconds}s",
            "-s",
            lua,
            f"http://127.0.0.1:{port}/api/v1/infer",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    start_at = time.monotonic()
    while wrk.poll() is None:
        samples.append((time.monotonic() - start_at, rss(process.pid)))
        with contextlib.suppress(subprocess.TimeoutExpired):
            wrk.wait(args.every)
    output = wrk.stdout.read() if wrk.stdout else ""
    rate = [line for line in output.splitlines() if line.startswith("Requests/sec")]
    print(f"  steady traffic: {rate[0] if rate else output}")
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--every", type=float, default=30.0)
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--polls", type=int, default=10_000)
    parser.add_argument("--sockets", type=int, default=5_000)
    args = parse(parser, "bench/soak.py")
    mib = 1024 * 1024

    q = queued(args.queued)
    per = (q["after"] - q["before"]) / q["queued"]
    print(
        f"queued requests : {q['queued']:,} queued, RSS {q['before'] / mib:.0f} -> "
        f"{q['after'] / mib:.0f} MiB: {per:,.0f} B per queued request"
    )

    gc.collect()
    with serving(HELD, args) as (process, port):
        polls = asyncio.run(long_polls(process.pid, port, args.polls))
        per = (polls["after_gets"] - polls["after_posts"]) / polls["polls"]
        print(
            f"long-polls      : {polls['polls']:,} waiting, RSS {polls['after_posts'] / mib:.0f}"
            f" -> {polls['after_gets'] / mib:.0f} MiB: {per:,.0f} B per waiting GET /result"
        )

    with serving(HELD, args) as (process, port):
        ws = asyncio.run(idle_sockets(process.pid, port, args.sockets))
        per = (ws["after"] - ws["before"]) / ws["sockets"]
        print(
            f"idle WebSockets : {ws['sockets']:,} open, RSS {ws['before'] / mib:.0f} -> "
            f"{ws['after'] / mib:.0f} MiB: {per:,.0f} B per socket"
        )

    print(f"steady traffic for {args.minutes:g} min (RSS every {args.every:g} s):")
    samples = steady(args)
    for at, value in samples:
        print(f"  {at:6.0f} s  {value / mib:7.1f} MiB")
    if len(samples) >= 3:
        settled = [v for at, v in samples if at >= samples[-1][0] / 3]  # after warm-up
        print(
            f"  after the first third: {min(settled) / mib:.1f} to {max(settled) / mib:.1f} MiB"
            f" ({(max(settled) - min(settled)) / mib:.1f} MiB spread)"
        )


if __name__ == "__main__":
    main()
