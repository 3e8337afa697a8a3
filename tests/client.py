"""The tests' WebSocket client: clients.link.Link with the tests' defaults and a login helper."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection

from clients.link import Link
from server.auth import mint_token

RECV_TIMEOUT_S = 10.0


class Client:
    """One authenticated (or not yet) connection to a server under test."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.link: Link | None = None
        self.welcome: dict[str, Any] = {}

    async def __aenter__(self) -> Client:
        self.link = await Link.open(self.url)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.link is not None:
            await self.link.close()

    @property
    def ws(self) -> ClientConnection | None:
        return self.link.ws if self.link is not None else None

    @property
    def conn(self) -> ClientConnection:
        return self._link.ws

    @property
    def _link(self) -> Link:
        assert self.link is not None, "connect first (async with Client(url))"
        return self.link

    def next_id(self) -> str:
        return self._link.next_id()

    async def send(self, frame: dict[str, Any]) -> None:
        await self._link.send(frame)

    async def send_raw(self, raw: str | bytes) -> None:
        await self._link.send_raw(raw)

    async def recv(self, timeout: float = RECV_TIMEOUT_S) -> dict[str, Any]:
        return await self._link.recv(timeout)

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
        return await self._link.request(frame, timeout)

    async def hello(self, token: str) -> dict[str, Any]:
        self.welcome = await self.request({"type": "hello", "token": token})
        return self.welcome


async def login(url: str, secret: str, user: str) -> Client:
    client = Client(url)
    await client.__aenter__()
    welcome = await client.hello(mint_token(secret, user))
    assert welcome["type"] == "welcome", welcome
    return client


async def chat(
    client: Client, text: str, timeout: float = RECV_TIMEOUT_S
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Send a chat; its `reply_delta` frames and its final answer (a `reply` or an `error`)."""
    ref = client.next_id()
    await client.send({"type": "chat", "id": ref, "text": text})
    deltas: list[dict[str, Any]] = []
    while True:
        frame = await client.recv(timeout)
        if frame.get("ref") != ref:
            continue
        if frame["type"] != "reply_delta":
            return deltas, frame
        deltas.append(frame)


async def first_delta(client: Client, text: str, timeout: float = RECV_TIMEOUT_S) -> str:
    """Send a chat and wait for its first `reply_delta`; the chat's ref."""
    ref = client.next_id()
    await client.send({"type": "chat", "id": ref, "text": text})
    frame = await client.recv_type("reply_delta", timeout)
    assert frame["ref"] == ref
    return ref
