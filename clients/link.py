"""A WebSocket link to the chat server for the terminal client: send frames, await answers."""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from protocol.errors import CloseCode
from protocol.frames import (
    AnyServerFrame,
    ReplyDelta,
    Welcome,
    decode_server_frame,
)

EXIT_OK = 0
EXIT_FAILED = 1  # a line was answered with an error, or the connection dropped
EXIT_USAGE = 2  # neither --user nor --token
EXIT_CANNOT_CONNECT = 3  # no server at --url, or it refused the handshake
EXIT_AUTH_REFUSED = 4  # the server closed with 4401: the token is not valid there
EXIT_INTERRUPTED = 130

OPEN_TIMEOUT_S = 10.0


class ClientError(Exception):
    """Ends the client with a message on stderr and an exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(slots=True)
class Waiter:
    """Someone waiting for the answer to one frame; deltas go to `on_delta` meanwhile."""

    future: asyncio.Future[AnyServerFrame]
    on_delta: Callable[[str], None] | None


class ChatLink:
    """One authenticated WebSocket: sends frames and routes each answer to its waiter by `ref`."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self.on_push: Callable[[AnyServerFrame], None] = lambda frame: None
        self._waiters: dict[str, Waiter] = {}
        # Chat ids are remembered by the server for retries: make them unique across runs.
        self._ids = (f"t{secrets.token_hex(4)}-{n}" for n in itertools.count(1))
        self._reader = asyncio.create_task(self._read())

    async def send(self, frame: dict[str, Any], frame_id: str | None = None) -> None:
        """Send a frame with an id, without waiting for an answer."""
        try:
            await self._ws.send(orjson.dumps({"id": frame_id or next(self._ids), **frame}).decode())
        except ConnectionClosed:
            raise self.closed_error() from None

    async def request(
        self, frame: dict[str, Any], on_delta: Callable[[str], None] | None = None
    ) -> AnyServerFrame:
        """Send a frame and return its final answer (a `reply`, an `error`, ...)."""
        if self._reader.done():
            raise self.closed_error()
        frame_id = next(self._ids)
        waiter = Waiter(asyncio.get_running_loop().create_future(), on_delta)
        self._waiters[frame_id] = waiter
        try:
            await self.send(frame, frame_id)
            return await waiter.future
        finally:
            del self._waiters[frame_id]

    async def close(self) -> None:
        await self._ws.close()
        await self._reader

    def closed_error(self) -> ClientError:
        code, reason = self._ws.close_code, self._ws.close_reason or ""
        if code == CloseCode.NOT_AUTHENTICATED:
            refused = f"the server refused the sign-in: {reason or 'not authenticated'}"
            return ClientError(refused, EXIT_AUTH_REFUSED)
        if code == CloseCode.GOING_AWAY:
            return ClientError("the server is shutting down; try again in a moment")
        return ClientError(f"the connection closed ({code or 'no close code'} {reason})".strip())

    async def _read(self) -> None:
        try:
            async for raw in self._ws:
                try:
                    frame = decode_server_frame(raw)
                except ValueError:
                    continue  # a frame from a newer server: not ours to understand
                self._route(frame)
        except ConnectionClosed:
            pass
        finally:
            error = self.closed_error()
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


async def open_link(url: str, token: str) -> tuple[ChatLink, Welcome]:
    """Connect and say hello; a ClientError that says why when that fails."""
    try:
        ws = await connect(url, open_timeout=OPEN_TIMEOUT_S, compression=None, max_size=None)
    except (OSError, InvalidURI, InvalidHandshake) as exc:
        why = connect_failure(exc)
        raise ClientError(f"cannot connect to {url}: {why}", EXIT_CANNOT_CONNECT) from None
    link = ChatLink(ws)
    welcome = await link.request({"type": "hello", "token": token})
    if not isinstance(welcome, Welcome):
        await link.close()
        raise ClientError(f"unexpected answer to hello: {welcome.type}", EXIT_CANNOT_CONNECT)
    return link, welcome


def connect_failure(exc: Exception) -> str:
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
