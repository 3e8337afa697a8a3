"""Frames to one client, in order: sent at once when they fit, else queued for a writer task."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from websockets.asyncio.connection import Connection
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

WRITE_LIMIT = 32 * 1024  # websockets' write_limit (set in app.py): above it, send() waits


def send_text_now(ws: Connection, data: bytes) -> bool:
    """Write a text frame at once if `ws.send()` would not wait; False (nothing sent) if it would.

    This is what `send()` does when the connection is open and its write buffer has room
    (websockets' sans-I/O protocol frames the message, the connection writes it), without the
    coroutine, the send lock and the drain that `send()` goes through for every frame.
    """
    if ws.protocol.state is not State.OPEN:
        return False
    if ws.transport.get_write_buffer_size() + len(data) > WRITE_LIMIT:
        return False
    ws.protocol.send_text(data)
    ws.send_data()
    return True


class Outbox:
    """Sends one connection's frames in the order they are put.

    A frame goes out at once when nothing waits before it and the socket's buffer has room;
    otherwise it queues behind a writer task. `on_stalled` is called (and the queue dropped)
    when a send waits longer than `send_timeout_s`, or when more than `limit_bytes` pile up
    behind a frame the client has not taken: a client that does not read its answers.
    The queue exists only while frames wait (an idle connection holds none).
    """

    __slots__ = ("_bytes", "_limit", "_on_stalled", "_queue", "_timeout", "_writer", "_ws")

    def __init__(
        self,
        ws: ServerConnection,
        limit_bytes: int,
        send_timeout_s: float,
        on_stalled: Callable[[], None],
    ) -> None:
        self._ws = ws
        self._limit = limit_bytes
        self._timeout = send_timeout_s
        self._on_stalled = on_stalled
        self._queue: deque[bytes] | None = None  # frames waiting for the writer
        self._bytes = 0
        self._writer: asyncio.Task[None] | None = None

    def put(self, data: bytes) -> None:
        if self._send_now(data):
            return
        if self._queue and self._bytes + len(data) > self._limit:
            self._stalled()
            return
        if self._queue is None:
            self._queue = deque()
        self._queue.append(data)
        self._bytes += len(data)
        if self._writer is None:
            self._writer = asyncio.create_task(self._write())

    def _send_now(self, data: bytes) -> bool:
        if self._writer is not None or self._queue:
            return False
        return send_text_now(self._ws, data)

    async def _write(self) -> None:
        ws = self._ws
        try:
            while self._queue:
                data = self._queue.popleft()
                self._bytes -= len(data)
                if ws.transport.get_write_buffer_size() + len(data) <= WRITE_LIMIT:
                    await ws.send(data, text=True)  # fits the buffer: never waits
                    continue
                async with asyncio.timeout(self._timeout):
                    await ws.send(data, text=True)
        except TimeoutError:
            self._stalled()
        except ConnectionClosed:
            self._drop()
        finally:
            self._writer = None
            if not self._queue:
                self._queue = None

    def _stalled(self) -> None:
        self._drop()
        self._on_stalled()

    def _drop(self) -> None:
        self._queue = None
        self._bytes = 0
