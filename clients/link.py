"""One connection to the chat server, through the wire only: frames out, each with an id, and
frames in, each answer matched to the frame it answers by its `ref`.

`Link` is read by whoever awaits it (the tests, the bots, the benchmark): `recv` returns the
frames in order, and `request` sends a frame and reads until its answer has come. `Router`
reads a link in a task of its own, for a client that waits for other things meanwhile (the
terminal): each answer goes to the request that waits for it and every other frame to `on_push`.

Server frames are decoded leniently: a field that a newer server added is ignored, and a frame
of a type this client does not know is skipped, never an error.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.protocol import State

from protocol.frames import SERVER_ADAPTER, AnyServerFrame, ReplyDelta

OPEN_TIMEOUT_S = 10.0
WRITE_LIMIT = 32 * 1024  # websockets' default write_limit: above it, send() waits for the socket
# What connecting may raise: no server, a refused or failed handshake, a URL that is not ws://.
CONNECT_ERRORS = (OSError, InvalidURI, InvalidHandshake)

Frame = dict[str, Any]


class BadFrame(ValueError):
    """A frame from the server that is not a JSON object; `kind` says which way it is not."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind  # "not_json" or "not_an_object"


class LinkClosed(Exception):
    """The connection closed before the answer came; the close code and reason say why."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"the connection closed ({code or 'no close code'} {reason})".strip())
        self.code = code
        self.reason = reason


def parse(raw: str | bytes) -> Frame:
    """A server frame as a dict (any fields, any type); BadFrame if it is not a JSON object."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadFrame("not_json") from None
    if not isinstance(value, dict):
        raise BadFrame("not_an_object")
    return value


def decode(raw: str | bytes) -> AnyServerFrame | None:
    """A server frame as its model, ignoring fields this client does not know; None for a frame
    it cannot read (a type added by a newer server)."""
    try:
        return SERVER_ADAPTER.validate_json(raw, extra="ignore")
    except ValidationError:
        return None


def answers(frame: Mapping[str, Any], ref: str) -> bool:
    """Whether `frame` is the final answer to the frame sent with id `ref` (a delta is not)."""
    return frame.get("ref") == ref and frame.get("type") != "reply_delta"


def describe_connect_failure(exc: BaseException) -> str:
    """Why connecting failed, in words for a person."""
    match exc:
        case InvalidURI():
            return "not a WebSocket URL (ws://HOST:PORT/ws)"
        case InvalidStatus():
            return f"the server answered HTTP {exc.response.status_code}"
        case ConnectionRefusedError():
            return "connection refused (is the server running?)"
        case TimeoutError():
            return "no answer in time"
    return str(exc) or type(exc).__name__


def send_text_now(ws: ClientConnection, data: bytes) -> bool:
    """Write a text frame at once if `ws.send()` would not wait; False (nothing sent) if it would.

    That is what `send()` does when the connection is open and its write buffer has room,
    without the coroutine, the send lock and the drain that `send()` goes through every time.
    """
    if ws.protocol.state is not State.OPEN:
        return False
    if ws.transport.get_write_buffer_size() + len(data) > WRITE_LIMIT:
        return False
    ws.protocol.send_text(data)
    ws.send_data()
    return True


class Link:
    """One WebSocket to the server, read by whoever awaits it."""

    def __init__(self, ws: ClientConnection, id_prefix: str = "c") -> None:
        self.ws = ws
        self._prefix = id_prefix
        self._ids = itertools.count(1)

    @classmethod
    async def open(cls, url: str, id_prefix: str = "c", **options: Any) -> Link:
        """Connect (no compression, no frame size limit unless `options` say otherwise); raises
        one of CONNECT_ERRORS when that fails."""
        settings: dict[str, Any] = {
            "open_timeout": OPEN_TIMEOUT_S,
            "compression": None,
            "max_size": None,
            **options,
        }
        return cls(await connect(url, **settings), id_prefix)

    async def __aenter__(self) -> Link:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def next_id(self) -> str:
        """A fresh frame id: the prefix and a count."""
        return f"{self._prefix}{next(self._ids)}"

    async def send(self, frame: Mapping[str, Any]) -> None:
        """Send one frame as it is (with the id it has, if any)."""
        data = orjson.dumps(frame)
        if not send_text_now(self.ws, data):
            await self.ws.send(data, text=True)

    async def send_raw(self, raw: str | bytes) -> None:
        """Send text (str) or binary (bytes) as it is, valid frame or not."""
        await self.ws.send(raw)

    async def recv(self, timeout: float | None = None) -> Frame:
        """The next frame, whatever it is; TimeoutError after `timeout` seconds (None: never)."""
        if timeout is None:
            raw = await self.ws.recv()
        else:
            async with asyncio.timeout(timeout):
                raw = await self.ws.recv()  # cancelling recv() loses no frame
        return parse(raw)

    async def request(
        self,
        frame: Mapping[str, Any],
        timeout: float | None = None,
        on_other: Callable[[Frame], object] | None = None,
    ) -> Frame:
        """Send `frame` with a fresh id (unless it has one) and return its final answer.

        Every other frame read meanwhile (pushes, deltas, answers to other frames) is given to
        `on_other`, or dropped. `timeout` bounds each wait for a frame, not the whole request.
        """
        sent = {"id": self.next_id(), **frame}
        ref = str(sent["id"])
        await self.send(sent)
        while True:
            answer = await self.recv(timeout)
            if answers(answer, ref):
                return answer
            if on_other is not None:
                on_other(answer)

    async def close(self) -> None:
        await self.ws.close()


@dataclass(slots=True)
class _Waiter:
    """A request waiting for its answer; its deltas go to `on_delta` meanwhile."""

    future: asyncio.Future[AnyServerFrame]
    on_delta: Callable[[str], None] | None


class Router:
    """A link read by a task of its own: answers go to the requests that wait for them, their
    deltas to each request's `on_delta`, and every other frame (pushes) to `on_push`."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.on_push: Callable[[AnyServerFrame], None] = lambda frame: None
        self._waiters: dict[str, _Waiter] = {}
        self._reader = asyncio.create_task(self._read())

    async def send(self, frame: Mapping[str, Any]) -> None:
        """Send a frame with a fresh id, without waiting for its answer."""
        await self._send({"id": self.link.next_id(), **frame})

    async def request(
        self, frame: Mapping[str, Any], on_delta: Callable[[str], None] | None = None
    ) -> AnyServerFrame:
        """Send a frame and return its final answer (a `reply`, an `error`, ...); LinkClosed if
        the connection closes first."""
        if self._reader.done():
            raise self.closed()
        frame_id = self.link.next_id()
        waiter = _Waiter(asyncio.get_running_loop().create_future(), on_delta)
        self._waiters[frame_id] = waiter
        try:
            await self._send({"id": frame_id, **frame})
            return await waiter.future
        finally:
            del self._waiters[frame_id]

    def closed(self) -> LinkClosed:
        """The error that says how the connection closed."""
        ws = self.link.ws
        return LinkClosed(ws.close_code, ws.close_reason or "")

    async def close(self) -> None:
        await self.link.close()
        await self._reader

    async def _send(self, frame: Mapping[str, Any]) -> None:
        try:
            await self.link.send(frame)
        except ConnectionClosed:
            raise self.closed() from None

    async def _read(self) -> None:
        try:
            async for raw in self.link.ws:
                frame = decode(raw)
                if frame is not None:
                    self._route(frame)
        except ConnectionClosed:
            pass
        finally:
            error = self.closed()
            for waiter in self._waiters.values():
                if not waiter.future.done():
                    waiter.future.set_exception(error)

    def _route(self, frame: AnyServerFrame) -> None:
        ref = getattr(frame, "ref", None)
        waiter = self._waiters.get(ref) if ref is not None else None
        if waiter is None:
            self.on_push(frame)
        elif isinstance(frame, ReplyDelta):
            if waiter.on_delta is not None:
                waiter.on_delta(frame.delta)
        elif not waiter.future.done():
            waiter.future.set_result(frame)
