"""The terminal client's connection: open it and say hello, say in words why that failed, and
open it again with backoff when it drops (as the web page does)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

from websockets.exceptions import InvalidStatus

from clients.link import CONNECT_ERRORS, Link, LinkClosed, Router, describe_connect_failure
from protocol.errors import CloseCode
from protocol.frames import Welcome

EXIT_OK = 0
EXIT_FAILED = 1  # a line was answered with an error, or the connection dropped
EXIT_USAGE = 2  # neither --user nor --token
EXIT_CANNOT_CONNECT = 3  # no server at --url, or it refused the handshake
EXIT_AUTH_REFUSED = 4  # the server closed with 4401: the token is not valid there
EXIT_INTERRUPTED = 130

WS_PATH = "/ws"
FIRST_RETRY_S = 0.5
MAX_RETRY_S = 10.0
# Closes after which opening again cannot help: the client ends, and says why.
FINAL_CLOSES = (
    CloseCode.NOT_AUTHENTICATED,
    CloseCode.POLICY_VIOLATION,
    CloseCode.MESSAGE_TOO_BIG,
)


class ClientError(Exception):
    """Ends the client with a message on stderr and an exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def closed_error(closed: LinkClosed) -> ClientError:
    """What to say (and exit with) when the connection closed under the client."""
    if closed.code == CloseCode.NOT_AUTHENTICATED:
        refused = f"the server refused the sign-in: {closed.reason or 'not authenticated'}"
        return ClientError(refused, EXIT_AUTH_REFUSED)
    if closed.code == CloseCode.GOING_AWAY:
        return ClientError("the server is shutting down; try again in a moment")
    return ClientError(str(closed))


def why_closed(closed: LinkClosed) -> str:
    """A dropped connection, in a few words."""
    if closed.code == CloseCode.GOING_AWAY:
        return "the server is shutting down"
    if closed.code is None:
        return "no close frame: the server or the network went away"
    return f"closed with {closed.code}{' ' + closed.reason if closed.reason else ''}"


def connect_failure(url: str, exc: BaseException) -> str:
    """Why connecting to `url` failed, and, for a URL without the /ws path, to add it."""
    why = describe_connect_failure(exc)
    path = urlsplit(url).path
    if isinstance(exc, InvalidStatus) and not path.rstrip("/").endswith(WS_PATH):
        return f"{why}: add {WS_PATH} to the URL (--url {with_ws_path(url)})"
    return why


def with_ws_path(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + WS_PATH))


async def open_link(url: str, token: str) -> tuple[Router, Welcome]:
    """Connect and say hello; a ClientError that says why when that fails (LinkClosed when the
    server closes the connection instead of answering)."""
    # Chat ids are remembered by the server for retries: make them unique across runs.
    try:
        link = await Link.open(url, id_prefix=f"t{secrets.token_hex(4)}-")
    except CONNECT_ERRORS as exc:
        why = connect_failure(url, exc)
        raise ClientError(f"cannot connect to {url}: {why}", EXIT_CANNOT_CONNECT) from None
    router = Router(link)
    try:
        welcome = await router.request({"type": "hello", "token": token})
    except LinkClosed:
        await router.close()
        raise
    if not isinstance(welcome, Welcome):
        await router.close()
        raise ClientError(f"unexpected answer to hello: {welcome.type}", EXIT_CANNOT_CONNECT)
    return router, welcome


class Reconnecting:
    """Watches a connection; when it drops, opens it again with backoff (0.5 s doubling to
    10 s) until it is back, telling `on_status` how it goes (None once it is back) and handing
    the new one to `on_back`. A close that opening again cannot help (a refused token) goes to
    `on_final` instead."""

    def __init__(
        self,
        url: str,
        token: str,
        on_status: Callable[[str | None], None],
        on_back: Callable[[Router, Welcome], None],
        on_final: Callable[[ClientError], None],
    ) -> None:
        self._url = url
        self._token = token
        self._on_status = on_status
        self._on_back = on_back
        self._on_final = on_final
        self.online = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def watch(self, router: Router) -> None:
        """Look after `router`'s connection from now on."""
        self.online.set()
        self._task = asyncio.create_task(self._watch(router), name="reconnecting")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self, router: Router) -> None:
        while True:
            await router.link.ws.wait_closed()
            closed = router.closed()
            if closed.code in FINAL_CLOSES:
                self._on_final(closed_error(closed))
                return
            self.online.clear()
            self._on_status(f"connection lost ({why_closed(closed)}): reconnecting")
            await router.close()
            opened = await self._open_again()
            if opened is None:
                return
            router, welcome = opened
            self.online.set()
            self._on_status(None)
            self._on_back(router, welcome)

    async def _open_again(self) -> tuple[Router, Welcome] | None:
        delay = FIRST_RETRY_S
        tries = 0
        while True:
            tries += 1
            try:
                return await open_link(self._url, self._token)
            except ClientError as exc:
                why = str(exc).removeprefix(f"cannot connect to {self._url}: ")
            except LinkClosed as closed:
                if closed.code in FINAL_CLOSES:
                    self._on_final(closed_error(closed))
                    return None
                why = why_closed(closed)
            self._on_status(f"reconnecting: {why}; try {tries + 1} in {delay:g} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_S)
