"""End to end over HTTP: ``POST /api/v1/infer`` then ``GET /api/v1/result/{id}`` for each
request, the server against a bare Starlette app with five ``asyncio.Queue``s.

What a user does: submit, then fetch the result. ``wrk`` (one thread, 64 connections, then
one) sends a POST with a new prompt; every answered POST's id goes in a queue, and the next
request sent (on whichever connection is free) is the GET of the oldest id. So POSTs and
GETs alternate, each GET waits for its request to finish (the server's long-poll), and the
rate counted is of completed pairs: ``min(POSTs, GETs answered completed)`` per second.

The baseline is the floor of the same work in Python: a Starlette app that parses the JSON,
pushes the request through five in-process ``asyncio.Queue``s (a task per queue, each only
handing on) and answers the GET when the last has resolved its future. The server runs the
example's defaults without its policies (no cache, dedup or limiter: the bare app has none)
and a zero-delay ``EchoWorker``. Pinned as ``bench/http_load.py`` is (server on core 0, wrk
on core 1), interleaved rounds, medians. At one connection the p50 of the two is compared:
the latency our server adds.

    python bench/roundtrip_load.py [--duration 5] [--rounds 3]
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_load import SERVER, arguments, parse, parse_wrk, serving, wrk

if TYPE_CHECKING:
    import argparse

BARE = """
import asyncio, contextlib, json, sys, uuid
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

queues = [asyncio.Queue() for _ in range(5)]
results: dict[str, asyncio.Future] = {}

async def hand_on(inbox, outbox) -> None:
    while True:
        item = await inbox.get()
        if outbox is None:
            request_id, prompt = item
            results[request_id].set_result(prompt)  # the echo
        else:
            await outbox.put(item)

@contextlib.asynccontextmanager
async def lifespan(app):
    tasks = [asyncio.create_task(hand_on(q, queues[i + 1] if i < 4 else None))
             for i, q in enumerate(queues)]
    yield
    for task in tasks:
        task.cancel()

async def infer(request: Request) -> JSONResponse:
    body = json.loads(await request.body())
    request_id = str(uuid.uuid4())
    results[request_id] = asyncio.get_running_loop().create_future()
    await queues[0].put((request_id, body["prompt"]))
    return JSONResponse({"request_id": request_id, "status": "pending", "result": None,
                         "error": None})

async def result(request: Request) -> JSONResponse:
    request_id = request.path_params["request_id"]
    future = results.get(request_id)
    if future is None:
        return JSONResponse({"error": "unknown request id"}, 404)
    text = await future
    del results[request_id]
    return JSONResponse({"request_id": request_id, "status": "completed", "result": text,
                         "error": None})

app = Starlette(routes=[Route("/api/v1/infer", infer, methods=["POST"]),
                        Route("/api/v1/result/{request_id}", result)], lifespan=lifespan)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=False, log_level="warning")
"""

LUA = """
local ids, head, tail, n = {}, 1, 0, 0
local posts, completed = 0, 0
local threads = {}
setup = function(thread) table.insert(threads, thread) end
request = function()
  if head <= tail then  -- the GET of the oldest answered POST
    local id = ids[head]
    ids[head] = nil
    head = head + 1
    return wrk.format("GET", "/api/v1/result/" .. id)
  end
  n = n + 1
  posts = posts + 1
  return wrk.format("POST", "/api/v1/infer", {["Content-Type"] = "application/json"},
                    string.format('%s', n))
end
response = function(status, headers, body)
  local id = body:match('"request_id":%%s*"([^"]+)"')
  if body:find('"status":%%s*"pending"') then
    tail = tail + 1
    ids[tail] = id
  elseif body:find('"status":%%s*"completed"') then
    completed = completed + 1
  end
  wrk.thread:set("posts", posts)
  wrk.thread:set("completed", completed)
end
done = function(summary, latency, requests)
  local p, c = 0, 0
  for _, thread in ipairs(threads) do
    p = p + (thread:get("posts") or 0)
    c = c + (thread:get("completed") or 0)
  end
  io.write(string.format("PAIRS posts=%%d completed=%%d\\n", p, c))
end
"""

BODY = {"prompt": "What is the capital of France? #%d", "session_id": "bench", "metadata": {}}


def run(source: str, lua: Path, connections: int, args: argparse.Namespace) -> dict[str, float]:
    with serving(source, args, {"BENCH_POLICIES": "0"}) as (_, port):
        output = wrk(args, port, lua, connections=connections)
    result = parse_wrk(output)
    match = re.search(r"PAIRS posts=(\d+) completed=(\d+)", output)
    if match is None:
        raise RuntimeError(f"no pair counts in wrk's output:\n{output}")
    if result["non_2xx"]:
        raise RuntimeError(f"{result['non_2xx']:.0f} answers were not 2xx")
    pairs = min(int(match.group(1)), int(match.group(2)))
    result["pairs"] = pairs / args.duration
    return result


def main() -> None:
    args = parse(arguments(__doc__.splitlines()[0]), "bench/roundtrip_load.py")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write(LUA % json.dumps(BODY).replace("'", "\\'"))
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        for _ in range(args.rounds):
            for connections in (args.connections, 1):
                for name, source in (("bare", BARE), ("server", SERVER)):
                    runs = results.setdefault((name, connections), [])
                    runs.append(run(source, Path(lua.name), connections, args))
    finally:
        os.unlink(lua.name)
    summary = {
        key: {k: statistics.median(r[k] for r in runs) for k in ("pairs", "p50_ms", "p99_ms")}
        for key, runs in results.items()
    }
    for (name, connections), s in summary.items():
        listed = ", ".join(f"{r['pairs']:,.0f}" for r in results[(name, connections)])
        print(
            f"{name:<6} c={connections:<3}: {s['pairs']:>8,.0f} pairs/s  p50 {s['p50_ms']:.3f} ms"
            f"  p99 {s['p99_ms']:.3f} ms  (runs: {listed})"
        )
    c = args.connections
    ratio = summary[("server", c)]["pairs"] / summary[("bare", c)]["pairs"]
    added = summary[("server", 1)]["p50_ms"] - summary[("bare", 1)]["p50_ms"]
    print(f"ratio at c={c}: {ratio:.2f} of the bare app's pairs/s")
    print(f"added p50 at one connection: {added:.3f} ms (per request, POST or GET)")


if __name__ == "__main__":
    main()
