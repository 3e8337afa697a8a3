"""Where the HTTP API is served: uvicorn in this process's event loop on a socket of its own
(SO_REUSEPORT under `--workers N`), with the body limit and CORS in front of the API."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Collection

import orjson
import uvicorn
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024
ALLOWED_METHODS = ("GET", "POST", "PATCH")
ALLOWED_HEADERS = ("Authorization", "Content-Type")
EXPOSED_HEADERS = ("Retry-After", "WWW-Authenticate", "Location")


class BodyLimit:
    """Answers 413 to a request whose body is larger than `limit` bytes, by its Content-Length
    or, without one, by what arrives; the app gets the body only when it fits."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                await self._too_large(send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only the disconnect is left to wait for

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        body = orjson.dumps({"detail": f"the body is larger than {self.limit} bytes"})
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class Cors(CORSMiddleware):
    """Starlette's CORS with a fixed set of origins: the ones the page's Origin check allows."""

    def __init__(self, app: ASGIApp, origins: Collection[str]) -> None:
        super().__init__(
            app,
            allow_origins=sorted(origins),
            allow_methods=ALLOWED_METHODS,
            allow_headers=ALLOWED_HEADERS,
            expose_headers=EXPOSED_HEADERS,
        )


def page_origins(host: str, port: int, allowed: Collection[str], loopback: bool) -> set[str]:
    """The browser origins that may call the API: the configured ones, and the web page's own
    (the WebSocket port; on loopback, by every loopback name)."""
    names = ("localhost", "127.0.0.1", "[::1]") if loopback else (host,)
    own = set()
    if host not in ("", "0.0.0.0", "::"):
        own = {f"{scheme}://{name}:{port}" for scheme in ("http", "https") for name in names}
    return own | set(allowed)


def bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A listening TCP socket; SO_REUSEPORT under `--workers N`, so every worker has one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class HttpServer:
    """uvicorn serving one ASGI app on a socket of ours, in the running loop. Not uvicorn's
    `serve()`, which would take over SIGINT and SIGTERM: the process's own handlers drain it."""

    def __init__(self, app: ASGIApp, sock: socket.socket, drain_timeout_s: float) -> None:
        self._socket = sock
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,  # uvicorn's loggers propagate to ours
            access_log=False,
            proxy_headers=False,
            server_header=False,
            ws="none",
            timeout_graceful_shutdown=int(max(1, drain_timeout_s)),
        )
        config.load()
        self._server = uvicorn.Server(config)
        self._server.lifespan = config.lifespan_class(config)
        self._ticks: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        port: int = self._socket.getsockname()[1]
        return port

    async def start(self) -> None:
        await self._server.startup(sockets=[self._socket])
        # uvicorn's once-a-second chores (the Date header) and its exit check
        self._ticks = asyncio.create_task(self._server.main_loop(), name="http-api")

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (bounded), close the connections."""
        self._server.should_exit = True
        if self._ticks is not None:
            await self._ticks
        await self._server.shutdown(sockets=[self._socket])
