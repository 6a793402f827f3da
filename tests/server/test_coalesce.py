"""CoalescingTransport: the writes of one loop turn leave in one write, none waits longer."""

from __future__ import annotations

import asyncio
import json
import socket

import anyio
import pytest
from websockets.asyncio.client import connect

from orchestrator import EchoWorker, PipelineConfig, spawn_pipeline
from orchestrator_server import ServerConfig, create_app
from orchestrator_server._coalesce import CoalescingTransport
from tests.server.conftest import recv, serve_edge, ws_url

pytestmark = pytest.mark.anyio


class Recording(asyncio.Transport):
    """The transport under the wrapper: records each write it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 1) if name == "peername" else default


async def _turn() -> None:
    await asyncio.sleep(0)  # one event-loop turn: what this file is about


async def test_the_writes_of_one_turn_leave_in_one_write() -> None:
    under = Recording()
    transport = CoalescingTransport(under, asyncio.get_running_loop())
    for i in range(100):
        transport.write(b"frame%d;" % i)
    assert under.writes == []
    assert transport.get_write_buffer_size() == sum(len(b"frame%d;" % i) for i in range(100))
    await _turn()
    assert under.writes == [b"".join(b"frame%d;" % i for i in range(100))]
    transport.write(bytearray(b"lone"))  # a lone write waits only for the end of its turn
    await _turn()
    assert under.writes[1:] == [b"lone"]


async def test_a_big_body_goes_to_the_socket_at_once_not_at_the_end_of_the_turn() -> None:
    under = Recording()
    transport = CoalescingTransport(under, asyncio.get_running_loop())
    transport.write(b"x" * 1000)
    transport.write(b"y" * 70_000)  # past 64 KiB: written now, where flow control sees it
    assert under.writes == [b"x" * 1000 + b"y" * 70_000]
    assert transport.get_write_buffer_size() == 0
    transport.write(b"z")
    await _turn()
    assert under.writes[1:] == [b"z"]


async def test_close_sends_what_is_buffered_and_abort_drops_it() -> None:
    under = Recording()
    transport = CoalescingTransport(under, asyncio.get_running_loop())
    transport.writelines([b"a", b"b"])
    transport.close()
    assert under.writes == [b"ab"]
    assert under.closed
    dropped = Recording()
    transport = CoalescingTransport(dropped, asyncio.get_running_loop())
    transport.write(b"never")
    transport.abort()
    await _turn()
    assert dropped.writes == []
    assert dropped.aborted
    assert transport.get_extra_info("peername") == ("127.0.0.1", 1)  # the rest passes through


async def test_the_bytes_arrive_in_order_over_a_real_socket() -> None:
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    real, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    transport = CoalescingTransport(real, loop)
    expected = b"".join(b"<%d>" % i for i in range(1000))
    for i in range(1000):
        transport.write(b"<%d>" % i)
    transport.close()
    theirs.setblocking(False)
    received = b""
    with anyio.fail_after(5):
        while True:
            chunk = await loop.sock_recv(theirs, 65536)
            if not chunk:
                break
            received += chunk
    theirs.close()
    assert received == expected


async def test_a_websocket_stream_through_the_edge_keeps_one_frame_per_token_in_order() -> None:
    prompt = " ".join(f"t{i}" for i in range(300))
    config = ServerConfig(access_log=False)
    pipeline = PipelineConfig(retriever=None, template="{input}")
    async with (
        spawn_pipeline(EchoWorker.with_delay(0), pipeline) as handles,
        serve_edge(create_app(handles, config), config) as (base, _),
        connect(ws_url(base)) as ws,
    ):
        for _ in range(2):  # two streams on one socket, one after the other
            await ws.send(json.dumps({"prompt": prompt, "stream": True}))
            assert (await recv(ws))["status"] == "processing"
            tokens = []
            while (frame := await recv(ws))["status"] == "streaming":
                tokens.append(frame["token"])
            assert frame["status"] == "completed"
            assert tokens == [f" t{i}" if i else "t0" for i in range(300)]
            assert frame["result"] == prompt
