"""A transport whose writes of one event-loop turn leave in one write. Private.

uvicorn writes a response's head and its body in two writes, and a WebSocket relaying a
batch of tokens one write per frame (the frame shape is one token each): a system call
each, the biggest single cost of a small request on this server. Behind this transport the
writes of one turn leave together, in one call, at the end of the turn they were made in
(frames stay frames of their own), so nothing waits for more than the rest of its turn;
64 KiB buffered go out at once, so a big body meets the socket's flow control as before.
Everything else (flow control, extra info, closing) is the socket's transport's: ``close``
and ``write_eof`` send what is buffered first, ``abort`` drops it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, final

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Iterable

__all__ = ["CoalescingTransport"]

_FLUSH_AT = 64 * 1024  # buffered bytes that go out at once, not at the end of the turn


@final
class CoalescingTransport:
    """Wraps ``transport``; see the module docstring."""

    __slots__ = ("_buffer", "_loop", "_size", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._buffer: list[bytes] = []
        self._size = 0  # bytes in the buffer

    def write(self, data: bytes | bytearray | memoryview) -> None:
        buffer = self._buffer
        buffer.append(data if type(data) is bytes else bytes(data))
        self._size += len(data)
        if self._size >= _FLUSH_AT:  # a big body: to the socket now, flow control with it
            self._flush()
        elif len(buffer) == 1:  # the turn's first: it flushes at the end of the turn
            self._loop.call_soon(self._flush)

    def writelines(self, lines: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in lines:
            self.write(data)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._size

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._buffer.clear()
        self._size = 0
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:  # the rest is the transport's own
        return getattr(self._transport, name)

    def _flush(self) -> None:
        buffer = self._buffer
        if not buffer:
            return
        data = buffer[0] if len(buffer) == 1 else b"".join(buffer)
        buffer.clear()
        self._size = 0
        if not self._transport.is_closing():
            self._transport.write(data)
