"""Persona changes between processes: one LISTEN connection per process, kept up with backoff.
It hears two channels: `persona_changed` (a user's switch) and `persona_catalogue` (an edit of
the catalogue, see server/catalogue.py). Its application name carries the process's tag, which
is how `run.py personas` finds the processes that must confirm an edit."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
import orjson

log = logging.getLogger(__name__)

CHANNEL = "persona_changed"
CATALOGUE_CHANNEL = "persona_catalogue"
APPLICATION_NAME = "persona-chat-listener"
BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)


@dataclass(frozen=True, slots=True)
class PersonaChange:
    """One committed persona switch, as NOTIFY carries it."""

    user_id: str
    personality: str
    previous: str
    version: int
    origin: str  # the process that made the change


def process_tag() -> str:
    """A tag unique to this process, so that it can skip its own notifications."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def listener_name(origin: str) -> str:
    """The application name of a process's listener connection (PostgreSQL keeps 63 bytes)."""
    return f"{APPLICATION_NAME}:{origin}"[:63]


def parse_change(payload: str) -> PersonaChange | None:
    """The change in a NOTIFY payload, or None when the payload is not one."""
    try:
        data = orjson.loads(payload)
        return PersonaChange(
            user_id=str(data["user_id"]),
            personality=str(data["personality"]),
            previous=str(data["previous"]),
            version=int(data["version"]),
            origin=str(data["origin"]),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


class ChangeListener:
    """Listens on `persona_changed` and `persona_catalogue`; tells `on_change`, `on_catalogue`
    (the raw payload) and `on_state` (up or down)."""

    def __init__(
        self,
        dsn: str,
        origin: str,
        on_change: Callable[[PersonaChange], None],
        on_state: Callable[[bool], None],
        timeout_s: float = 5.0,
        on_catalogue: Callable[[str], None] | None = None,
    ) -> None:
        self._dsn = dsn
        self._origin = origin
        self._on_change = on_change
        self._on_catalogue = on_catalogue
        self._on_state = on_state
        self._timeout_s = timeout_s
        self._task: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self.reconnects = 0

    async def start(self) -> None:
        """Connect once (so a start-up failure shows), then keep the connection up."""
        conn = await self._connect()
        self._task = asyncio.create_task(self._keep(conn), name="persona-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _connect(self) -> asyncpg.Connection:
        conn: asyncpg.Connection = await asyncpg.connect(
            self._dsn,
            timeout=self._timeout_s,
            server_settings={"application_name": listener_name(self._origin)},
        )
        self._lost.clear()
        conn.add_termination_listener(lambda _conn: self._lost.set())
        try:
            await conn.add_listener(CHANNEL, self._notified)
            if self._on_catalogue is not None:
                await conn.add_listener(CATALOGUE_CHANNEL, self._catalogue_notified)
        except BaseException:
            conn.terminate()
            raise
        self._on_state(True)
        return conn

    async def _keep(self, conn: asyncpg.Connection) -> None:
        try:
            while True:
                await self._lost.wait()
                self._on_state(False)
                log.warning("persona listener lost its connection; reconnecting")
                lost_at = asyncio.get_running_loop().time()
                conn, attempts = await self._reconnect()
                self.reconnects += 1
                down_s = asyncio.get_running_loop().time() - lost_at
                log.info("persona listener is back after %.1f s (%d attempts)", down_s, attempts)
        finally:
            if not conn.is_closed():
                await conn.close(timeout=self._timeout_s)

    async def _reconnect(self) -> tuple[asyncpg.Connection, int]:
        """Connect again, with backoff; one line for the first failure (the database is down,
        most likely, and the keeper of an embedded one says so), the others at DEBUG."""
        attempt = 0
        while True:
            await asyncio.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
            try:
                return await self._connect(), attempt + 1
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                attempt += 1
                level = logging.WARNING if attempt == 1 else logging.DEBUG
                log.log(level, "persona listener reconnect %d failed: %s", attempt, exc)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        change = parse_change(str(payload))
        if change is None:
            log.warning("ignored a malformed %s notification", CHANNEL)
            return
        if change.origin != self._origin:
            self._on_change(change)

    def _catalogue_notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        if self._on_catalogue is not None:
            self._on_catalogue(str(payload))
