"""The server as a user meets it: uvicorn on a real port, httpx and websockets clients.

The seed's PowerShell and wscat walkthroughs, translated, plus what they never tried:
concurrent requests on one socket, token frames, clients that leave mid-stream.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect

from orchestrator import EchoWorker, PipelineConfig, RequestStatus, spawn_pipeline
from orchestrator_server import ServerConfig, create_app
from tests.helpers import GateWorker, prompt_for
from tests.server.conftest import recv, serve, ws_url

pytestmark = pytest.mark.anyio

QUIET = ServerConfig(access_log=False)


async def test_seed_rest_walkthrough() -> None:
    async with (
        spawn_pipeline(EchoWorker()) as handles,
        serve(create_app(handles, QUIET)) as base,
        httpx.AsyncClient(base_url=base) as client,
    ):
        submitted = await client.post(
            "/api/v1/infer",
            json={
                "prompt": "What is the capital of France?",
                "session_id": "user-123",
                "metadata": {"priority": "high"},
            },
        )
        request_id = submitted.json()["request_id"]
        result = (await client.get(f"/api/v1/result/{request_id}")).json()
        status = (await client.get(f"/api/v1/status/{request_id}")).json()
        health = (await client.get("/health")).json()
    assert submitted.status_code == 200
    assert result["status"] == "completed"
    assert result["result"] == prompt_for("What is the capital of France?")
    assert status == result
    assert health["status"] == "healthy"


async def test_seed_websocket_walkthrough_and_bad_input_keeps_the_socket() -> None:
    async with (
        spawn_pipeline(EchoWorker()) as handles,
        serve(create_app(handles, QUIET)) as base,
        connect(ws_url(base)) as ws,
    ):
        await ws.send("this is not json")
        assert "not valid JSON" in str((await recv(ws))["error"])
        await ws.send(json.dumps({"session_id": "ws-user-1"}))
        assert "'prompt'" in str((await recv(ws))["error"])
        await ws.send(json.dumps({"prompt": "Hello, how are you?", "session_id": "ws-user-1"}))
        processing = await recv(ws)
        completed = await recv(ws)
    assert processing["status"] == "processing"
    assert completed == {
        "request_id": processing["request_id"],
        "status": "completed",
        "result": prompt_for("Hello, how are you?"),
    }


async def test_many_requests_in_flight_on_one_socket() -> None:
    async with (
        spawn_pipeline(EchoWorker()) as handles,
        serve(create_app(handles, QUIET)) as base,
        connect(ws_url(base)) as ws,
    ):
        for i in range(20):
            await ws.send(json.dumps({"prompt": f"question {i}"}))
        frames = [await recv(ws) for _ in range(40)]
    ids = [f["request_id"] for f in frames if f["status"] == "processing"]
    done = {f["request_id"]: f["result"] for f in frames if f["status"] == "completed"}
    assert len(ids) == 20
    assert set(done) == set(ids)
    assert sorted(map(str, done.values())) == sorted(prompt_for(f"question {i}") for i in range(20))


async def test_websocket_token_frames_precede_the_result() -> None:
    config = PipelineConfig(template="{input}")
    async with (
        spawn_pipeline(EchoWorker(), config) as handles,
        serve(create_app(handles, QUIET)) as base,
        connect(ws_url(base)) as ws,
    ):
        await ws.send(json.dumps({"prompt": "a b c", "stream": True}))
        frames = [await recv(ws) for _ in range(5)]
    assert [f["status"] for f in frames] == [
        "processing",
        "streaming",
        "streaming",
        "streaming",
        "completed",
    ]
    assert [f["token"] for f in frames[1:4]] == ["a", " b", " c"]
    assert frames[-1]["result"] == "a b c"


async def test_websocket_failures_and_oversized_messages() -> None:
    worker = GateWorker(open_=True)
    worker.fail_with = RuntimeError("provider down")
    config = ServerConfig(access_log=False, max_ws_message_size=100)
    async with (
        spawn_pipeline(worker) as handles,
        serve(create_app(handles, config)) as base,
        connect(ws_url(base)) as ws,
    ):
        await ws.send(json.dumps({"prompt": "x" * 200}))
        assert "larger than 100 bytes" in str((await recv(ws))["error"])
        await ws.send(json.dumps({"prompt": "x"}))
        processing = await recv(ws)
        failed = await recv(ws)
    assert failed["request_id"] == processing["request_id"]
    assert failed["status"] == "failed"
    assert "provider down" in str(failed["error"])


async def test_websocket_client_leaving_cancels_its_requests() -> None:
    worker = GateWorker()
    async with spawn_pipeline(worker) as handles, serve(create_app(handles, QUIET)) as base:
        async with connect(ws_url(base)) as ws:
            await ws.send(json.dumps({"prompt": "long question"}))
            request_id = str((await recv(ws))["request_id"])
            await worker.wait_started(1)
        ticket = handles.get(request_id)
        assert ticket is not None
        with anyio.fail_after(5):
            await ticket.wait()
    assert ticket.status is RequestStatus.CANCELLED
    assert worker.cancelled == 1


async def test_sse_over_a_real_socket() -> None:
    config = PipelineConfig(template="{input}")
    async with (
        spawn_pipeline(EchoWorker(), config) as handles,
        serve(create_app(handles, QUIET)) as base,
        httpx.AsyncClient(base_url=base) as client,
        client.stream(
            "POST", "/api/v1/infer", json={"prompt": "streamed over http", "stream": True}
        ) as response,
    ):
        lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    payloads = [json.loads(line[6:]) for line in lines]
    assert "".join(p["token"] for p in payloads[1:-1]) == "streamed over http"
    assert payloads[-1]["status"] == "completed"


async def test_sse_client_leaving_mid_stream_cancels_the_request() -> None:
    worker = GateWorker(open_=True)
    worker.token_gates = [asyncio.Event(), asyncio.Event()]
    worker.token_gates[0].set()  # the first token flows, the second never comes
    config = PipelineConfig(template="{input}")
    async with spawn_pipeline(worker, config) as handles, serve(create_app(handles, QUIET)) as base:
        async with (
            httpx.AsyncClient(base_url=base) as client,
            client.stream("POST", "/api/v1/infer", json={"prompt": "a b", "stream": True}) as r,
        ):
            data = (json.loads(line[6:]) async for line in r.aiter_lines() if line[:6] == "data: ")
            first = await anext(data)
            assert (await anext(data))["token"] == "a"  # then the client goes away
        ticket = handles.get(first["request_id"])
        assert ticket is not None
        with anyio.fail_after(5):
            await ticket.wait()
    assert ticket.status is RequestStatus.CANCELLED
    assert worker.cancelled == 1


async def test_rest_errors_over_a_real_socket() -> None:
    config = ServerConfig(access_log=False, max_request_size=64)
    async with (
        spawn_pipeline(EchoWorker()) as handles,
        serve(create_app(handles, config)) as base,
        httpx.AsyncClient(base_url=base) as client,
    ):
        too_big = await client.post("/api/v1/infer", json={"prompt": "x" * 100})
        bad = await client.post(
            "/api/v1/infer", content=b"{", headers={"content-type": "application/json"}
        )
        plain = await client.post("/api/v1/infer", content=b"{", headers={"content-type": "x"})
        missing = await client.get("/api/v1/status/nope")
    codes = (too_big.status_code, bad.status_code, plain.status_code, missing.status_code)
    assert codes == (413, 400, 415, 404)
    answers = (too_big, bad, plain, missing)
    assert all(r.headers["content-type"] == "application/json" for r in answers)


async def test_shutdown_drains_requests_in_flight() -> None:
    worker = GateWorker()
    handles = spawn_pipeline(worker)
    async with serve(create_app(handles, QUIET)) as base, httpx.AsyncClient(base_url=base) as c:
        request_id = (await c.post("/api/v1/infer", json={"prompt": "x"})).json()["request_id"]
        await worker.wait_started(1)
    shutting = asyncio.create_task(handles.shutdown())
    await anyio.wait_all_tasks_blocked()
    assert not shutting.done()  # waiting for the request in flight
    worker.gate.set()
    await shutting
    ticket = handles.get(request_id)
    assert ticket is not None
    assert ticket.status is RequestStatus.COMPLETED


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _wait_healthy(client: httpx.AsyncClient, process: subprocess.Popen[bytes]) -> None:
    with anyio.fail_after(20):
        while True:  # an external process: polling its health is the only signal
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                if (await client.get("/health")).status_code == 200:
                    return
            except httpx.TransportError:
                await anyio.sleep(0.05)


async def test_cli_serves_and_stops_cleanly_on_sigterm() -> None:
    port = _free_port()
    env = {**os.environ, "SERVER_PORT": str(port), "SERVER_HOST": "127.0.0.1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator_server"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            await _wait_healthy(client, process)
            request_id = (await client.post("/api/v1/infer", json={"prompt": "cli"})).json()[
                "request_id"
            ]
            result = (await client.get(f"/api/v1/result/{request_id}")).json()
        assert result["result"] == prompt_for("cli")
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(20):
            code = await anyio.to_thread.run_sync(process.wait)
        assert code == 0
        assert process.stderr is not None
        assert b"Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream:
                stream.close()


def test_cli_refuses_several_workers_without_a_shared_store() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator_server", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "--workers > 1 needs --redis-url" in done.stderr


def test_cli_rejects_a_bad_environment() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator_server"],
        env={**os.environ, "SERVER_PORT": "eighty"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "SERVER_PORT='eighty'" in done.stderr


async def test_cli_serves_an_openai_compatible_worker() -> None:
    from tests.workers.fake_servers import TOKENS, FakeOpenAi, FakeServer

    port = _free_port()
    async with FakeServer(FakeOpenAi()) as fake:
        env = {
            **os.environ,
            "SERVER_PORT": str(port),
            "SERVER_HOST": "127.0.0.1",
            "OPENAI_BASE_URL": f"{fake.url}/v1",
            "OPENAI_MODEL": "tiny",
        }
        env.pop("OPENAI_API_KEY", None)
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator_server", "--worker", "openai"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                await _wait_healthy(client, process)
                submitted = await client.post("/api/v1/infer", json={"prompt": "hi"})
                request_id = submitted.json()["request_id"]
                result = (await client.get(f"/api/v1/result/{request_id}")).json()
        finally:
            process.terminate()
            await anyio.to_thread.run_sync(process.wait)
            if process.stderr:
                process.stderr.close()
    assert result["status"] == "completed", result
    assert result["result"] == "".join(TOKENS)
    assert json.loads(fake.requests[-1].body)["model"] == "tiny"


def test_cli_explains_a_missing_worker_setting() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "VLLM_"))}
    for worker, missing in (("openai", "OPENAI_API_KEY"), ("vllm", "VLLM_MODEL")):
        done = subprocess.run(
            [sys.executable, "-m", "orchestrator_server", "--worker", worker],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 2
        assert missing in done.stderr
        assert "Traceback" not in done.stderr
