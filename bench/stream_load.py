"""Token streaming: tokens per second to 64 SSE clients and 64 WebSocket clients.

Every request is a new prompt of 256 words, so ``EchoWorker.with_delay(0)`` streams 256
tokens for it, with no delay. The baseline is a bare Starlette app relaying the same tokens
from an async generator, one write per token (the same event names and JSON shapes as the
example server's ``"stream": true`` answer). SSE is loaded by ``wrk`` (a request ends with
its response, so tokens/s is answers/s times 256); WebSocket by a small client in this
file that runs in its own process (each connection sends a prompt with ``"stream": true``,
reads its frames to the final one, counts the token frames, sends the next). Servers are
pinned to core 0 and the clients to core 1, interleaved rounds, medians; each server's
stream is checked for all 256 tokens and the right text before it is loaded.

    python bench/stream_load.py [--duration 5] [--connections 64] [--rounds 3]
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_load import LUA, arguments, parse, parse_wrk, pin, serving, wrk
from http_load import SERVER as HTTP_SERVER

if TYPE_CHECKING:
    import argparse

TOKENS = 256
WORDS = " ".join(f"w{i}" for i in range(TOKENS - 1))  # and a request number: 256 tokens

BARE = """
import json, sys, uuid
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from orchestrator.workers.base import split_tokens

async def generate(prompt):  # what the worker does: the prompt's words, no delay
    for token in split_tokens(prompt):
        yield token

def event(name, data):
    return f"event: {name}\\ndata: {json.dumps(data)}\\n\\n"

async def infer(request: Request) -> StreamingResponse:
    body = json.loads(await request.body())
    request_id = str(uuid.uuid4())

    async def sse():
        yield event("request", {"request_id": request_id, "status": "pending"})
        out = []
        async for token in generate(body["prompt"]):
            out.append(token)
            yield event("token", {"request_id": request_id, "token": token})
        done = {"request_id": request_id, "status": "completed", "result": "".join(out),
                "error": None}
        yield event("done", done)

    return StreamingResponse(sse(), media_type="text/event-stream")

async def stream(websocket: WebSocket) -> None:
    await websocket.accept()
    while True:
        body = json.loads(await websocket.receive_text())
        request_id = str(uuid.uuid4())
        await websocket.send_text(json.dumps({"request_id": request_id, "status": "processing"}))
        out = []
        async for token in generate(body["prompt"]):
            out.append(token)
            frame = {"request_id": request_id, "status": "streaming", "token": token}
            await websocket.send_text(json.dumps(frame))
        done = {"request_id": request_id, "status": "completed", "result": "".join(out)}
        await websocket.send_text(json.dumps(done))

app = Starlette(routes=[Route("/api/v1/infer", infer, methods=["POST"]),
                        WebSocketRoute("/api/v1/stream", stream)])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=False, log_level="warning")
"""

# The example server's policies, the worker streaming the prompt as it is (no demo context).
SERVER = HTTP_SERVER.replace(
    "pipeline = await build_pipeline_config(config, stack)",
    "pipeline = attrs.evolve(await build_pipeline_config(config, stack), retriever=None,"
    " template='{input}')",
).replace("import asyncio,", "import attrs, asyncio,")
assert "attrs.evolve" in SERVER
assert "import attrs" in SERVER


def body(n: int) -> dict[str, object]:
    return {"prompt": f"{WORDS} #{n}", "session_id": "bench", "stream": True}


def check_sse(port: int, process: subprocess.Popen[bytes]) -> None:
    """Wait for the server, then check one stream: 256 token events, the right text."""
    deadline = time.monotonic() + 30
    while True:  # another process: polling is the only signal
        if process.poll() is not None:
            raise RuntimeError("server exited during startup")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/v1/infer",
            data=json.dumps(body(0)).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                text = response.read().decode()
                break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    events = [e for e in text.split("\n\n") if e]
    tokens = [e for e in events if e.startswith("event: token")]
    done = json.loads(events[-1].partition("data: ")[2])
    if len(tokens) != TOKENS or done["result"] != body(0)["prompt"]:
        raise RuntimeError(f"bad stream: {len(tokens)} tokens, result {done['result']!r:.40}")


# -- the WebSocket client (runs in its own process: ``--ws-client PORT SECONDS N``) ----------


async def _ws_connection(port: int, stop_at: float, counts: list[int], worker: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /api/v1/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"no upgrade: {head[:40]!r}")
    buffer, n = b"", 0
    loop = asyncio.get_running_loop()
    while loop.time() < stop_at:
        n += 1
        payload = json.dumps(body(worker * 10_000_000 + n)).encode()
        mask = os.urandom(4)
        masked = (
            int.from_bytes(payload, "big")
            ^ int.from_bytes((mask * (len(payload) // 4 + 1))[: len(payload)], "big")
        ).to_bytes(len(payload), "big")
        length = len(payload)
        header = bytes([0x81, 0xFE]) + length.to_bytes(2, "big") if length < 65536 else b""
        writer.write(header + mask + masked)
        tokens, finished, at = 0, False, 0
        while not finished:  # server frames: unmasked text frames, payloads under 64 KiB
            while len(buffer) - at >= 2:
                size, start = buffer[at + 1] & 0x7F, at + 2
                if size == 126:
                    if len(buffer) - at < 4:
                        break
                    size, start = int.from_bytes(buffer[at + 2 : at + 4], "big"), at + 4
                if len(buffer) < start + size:
                    break
                kind = buffer.find(b'"status": "', start, start + size)
                status = buffer[kind + 11 : kind + 14]
                at = start + size
                if status == b"str":
                    tokens += 1
                elif status == b"com":
                    finished = True
                    break
                elif status != b"pro":
                    raise RuntimeError(f"unexpected frame {buffer[start : start + 80]!r}")
            buffer = buffer[at:]
            at = 0
            if not finished:
                data = await reader.read(262144)
                if not data:
                    raise RuntimeError("server closed the socket")
                buffer += data
        if tokens != TOKENS:
            raise RuntimeError(f"{tokens} token frames, expected {TOKENS}")
        counts[0] += 1
    writer.close()


async def _ws_client(port: int, seconds: float, connections: int) -> None:
    counts = [0]
    loop = asyncio.get_running_loop()
    start = loop.time()
    stop_at = start + seconds
    await asyncio.gather(*(_ws_connection(port, stop_at, counts, i) for i in range(connections)))
    print(json.dumps({"streams": counts[0], "seconds": loop.time() - start}))


# -- the runs --------------------------------------------------------------------------------


def run(source: str, protocol: str, lua: Path, args: argparse.Namespace) -> float:
    """Tokens per second delivered by one server over one protocol."""
    with serving(source, args, ready=check_sse) as (_, port):
        if protocol == "sse":
            result = parse_wrk(wrk(args, port, lua))
            if result["non_2xx"]:
                raise RuntimeError(f"{result['non_2xx']:.0f} answers were not 200")
            return result["rps"] * TOKENS
        command = [
            *pin(1, args),
            sys.executable,
            __file__,
            "--ws-client",
            str(port),
            str(args.duration),
            str(args.connections),
        ]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    counts = json.loads(output)
    return float(counts["streams"] * TOKENS / counts["seconds"])


def main() -> None:
    if sys.argv[1:2] == ["--ws-client"]:
        port, seconds, connections = sys.argv[2:5]
        asyncio.run(_ws_client(int(port), float(seconds), int(connections)))
        return
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parse(parser, "bench/stream_load.py")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        template = json.dumps({**body(0), "prompt": f"{WORDS} #%d"}).replace("'", "\\'")
        lua.write(LUA % template)
    variants = {
        "bare SSE": (BARE, "sse"),
        "server SSE": (SERVER, "sse"),
        "bare WebSocket": (BARE, "ws"),
        "server WebSocket": (SERVER, "ws"),
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for _ in range(args.rounds):
            for name, (source, protocol) in variants.items():
                results[name].append(run(source, protocol, Path(lua.name), args))
    finally:
        os.unlink(lua.name)
    summary = {name: statistics.median(runs) for name, runs in results.items()}
    baseline = summary["bare SSE"]
    if args.json:
        print(json.dumps({"tokens_per_second": summary, "runs": results}))
        return
    for name, rate in summary.items():
        runs = ", ".join(f"{r:,.0f}" for r in results[name])
        print(
            f"{name:<17}: {rate:>10,.0f} tokens/s  {rate / TOKENS:>7,.0f} streams/s  "
            f"{rate / baseline:.2f}x bare SSE  (runs: {runs})"
        )


if __name__ == "__main__":
    main()
