"""A small real WebSocket client for the tests: send frames, read answers, match refs."""

from __future__ import annotations

import asyncio
import itertools
from types import TracebackType
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect

from server.auth import mint_token

RECV_TIMEOUT_S = 10.0


class Client:
    """One authenticated (or not yet) connection to a server under test."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ws: ClientConnection | None = None
        self._ids = itertools.count(1)
        self.welcome: dict[str, Any] = {}

    async def __aenter__(self) -> Client:
        self.ws = await connect(self.url, max_size=None, compression=None)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.ws is not None:
            await self.ws.close()

    @property
    def conn(self) -> ClientConnection:
        assert self.ws is not None
        return self.ws

    def next_id(self) -> str:
        return f"c{next(self._ids)}"

    async def send(self, frame: dict[str, Any]) -> None:
        await self.conn.send(orjson.dumps(frame).decode())

    async def send_raw(self, raw: str | bytes) -> None:
        await self.conn.send(raw)

    async def recv(self, timeout: float = RECV_TIMEOUT_S) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.conn.recv(), timeout)
        value = orjson.loads(raw)
        assert isinstance(value, dict)
        return value

    async def recv_type(self, kind: str, timeout: float = RECV_TIMEOUT_S) -> dict[str, Any]:
        """The next frame of type `kind`, skipping others (pushes, deltas)."""
        while True:
            frame = await self.recv(timeout)
            if frame["type"] == kind:
                return frame

    async def request(
        self, frame: dict[str, Any], timeout: float = RECV_TIMEOUT_S
    ) -> dict[str, Any]:
        """Send `frame` with a fresh id and return its final answer (skipping deltas and pushes)."""
        frame = {"id": self.next_id(), **frame}
        await self.send(frame)
        while True:
            answer = await self.recv(timeout)
            if answer.get("ref") == frame["id"] and answer["type"] != "reply_delta":
                return answer

    async def hello(self, token: str) -> dict[str, Any]:
        self.welcome = await self.request({"type": "hello", "token": token})
        return self.welcome


async def login(url: str, secret: str, user: str) -> Client:
    client = Client(url)
    await client.__aenter__()
    welcome = await client.hello(mint_token(secret, user))
    assert welcome["type"] == "welcome", welcome
    return client
