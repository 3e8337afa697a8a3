"""The bots' HTTP side: `PATCH /avatars/me/persona` on an instance's HTTP API, over one
kept-alive HTTP/1.1 connection per bot (a pooled client costs a loaded load generator more
CPU per request than the server spends on it, and times its own queue, not the server)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

PERSONA_PATH = "/avatars/me/persona"
MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Answer:
    """What a PATCH got: the status (0 when no answer came) and the JSON body, if any."""

    status: int
    body: dict[str, Any]
    retry_after: str | None = None
    error: str = ""  # why no answer came (the exception's name)


class BadResponse(Exception):
    """The server's answer is not HTTP/1.1 that this client reads (no Content-Length, ...)."""


@dataclass(frozen=True, slots=True)
class Api:
    """How the bots of a run reach the HTTP API: the timeout of a request."""

    timeout_s: float

    def link(self, api_url: str, token: str, source: str | None = None) -> ApiLink:
        return ApiLink(api_url, token, self.timeout_s, source)


class ApiLink:
    """One bot's kept-alive connection to an HTTP API, opened when first needed and again
    when the server has closed it."""

    def __init__(self, api_url: str, token: str, timeout_s: float, source: str | None) -> None:
        parts = urlsplit(api_url)
        self._tls = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._tls else 80)
        self._prefix = parts.path.rstrip("/")
        self._authority = parts.netloc
        self._token = token
        self._timeout_s = timeout_s
        self._source = source
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def set_persona(self, personality: str) -> Answer:
        """Switch the avatar of the token's user."""
        body = orjson.dumps({"personality": personality})
        try:
            async with asyncio.timeout(self._timeout_s):
                return await self._request("PATCH", PERSONA_PATH, body)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, BadResponse) as exc:
            await self.close()
            return Answer(0, {}, error=type(exc).__name__)

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _request(self, method: str, path: str, body: bytes) -> Answer:
        reused = self._writer is not None
        try:
            return await self._exchange(method, path, body)
        except (ConnectionError, asyncio.IncompleteReadError):
            if not reused:
                raise
        await self.close()  # the server closed the idle connection: once more on a new one
        return await self._exchange(method, path, body)

    async def _exchange(self, method: str, path: str, body: bytes) -> Answer:
        if self._writer is None:
            local = (self._source, 0) if self._source is not None else None
            context = ssl.create_default_context() if self._tls else None
            self._reader, self._writer = await asyncio.open_connection(
                self._host, self._port, ssl=context, local_addr=local
            )
        reader, writer = self._reader, self._writer
        assert reader is not None
        head = (
            f"{method} {self._prefix}{path} HTTP/1.1\r\nHost: {self._authority}\r\n"
            f"Authorization: Bearer {self._token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode("latin-1") + body)
        await writer.drain()
        status, headers = _parse_head(await reader.readuntil(b"\r\n\r\n"))
        length = int(headers.get("content-length", "-1"))
        if not 0 <= length <= MAX_BODY_BYTES:
            raise BadResponse("no Content-Length")
        raw = await reader.readexactly(length)
        if headers.get("connection", "").lower() == "close":
            await self.close()
        try:
            parsed = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            parsed = {}
        return Answer(
            status, parsed if isinstance(parsed, dict) else {}, headers.get("retry-after")
        )


def _parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    if len(raw) > MAX_HEAD_BYTES:
        raise BadResponse("head too long")
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise BadResponse("not an HTTP/1.x status line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers
