"""The persona catalogue of this process, and how edits reach every process.

Every process reads the `personas` table at start and keeps a `Catalogue` (protocol/personas.py).
An edit (`run.py personas`) bumps the persona's version and, in the same transaction, notifies
`persona_catalogue` with `{"id", "version", "removed"}`. Each process's listener hears it: the
persona is `stale` at once (no reply is rendered from the old copy), its row is read again, and
the process confirms on `persona_catalogue_ack` with `{"id", "version", "listener"}`. The editor
waits for a confirmation from every listener connected to the database (their application names
carry the process tags, see server/notify.py) before it says the edit is done, so that once it
has, no reply on any process is rendered with the old card. While a process's listener is down
it may miss edits: every persona is then read again before a reply uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from protocol.cards import CardError, parse_card, persona_card
from protocol.personas import Catalogue, Persona
from server.notify import APPLICATION_NAME, CATALOGUE_CHANNEL
from server.store import Store

log = logging.getLogger(__name__)

ACK_CHANNEL = "persona_catalogue_ack"
RELOADED = "*"  # the id of a confirmation of a whole read of the catalogue
RECHECK_S = 0.25  # how often an editor asks again which processes are listening
RETRY_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)  # reading an edited persona again, while it fails


@dataclass(frozen=True, slots=True)
class CatalogueChange:
    """One committed edit of the catalogue, as NOTIFY carries it."""

    id: str
    version: int
    removed: bool = False


def change_payload(change: CatalogueChange) -> str:
    return orjson.dumps(
        {"id": change.id, "version": change.version, "removed": change.removed}
    ).decode()


def parse_catalogue_change(payload: str) -> CatalogueChange | None:
    try:
        data = orjson.loads(payload)
        return CatalogueChange(str(data["id"]), int(data["version"]), bool(data["removed"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def persona_from_row(row: asyncpg.Record | dict[str, Any]) -> Persona:
    """A catalogue row as the conversation uses it; CardError for a card that does not parse
    (one written to the table by hand)."""
    card = row["card"]
    value = orjson.loads(card) if isinstance(card, str | bytes) else card
    parsed = replace(parse_card(value), id=row["id"])
    return Persona(persona_card(parsed), int(row["version"]), bool(row["enabled"]))


class CatalogueKeeper:
    """Keeps this process's `Catalogue` current: loads it, applies notified edits, confirms
    them, and reads a persona again when a reply needs it and the copy may be old."""

    def __init__(self, store: Store, listener_tag: str) -> None:
        self.catalogue = Catalogue()
        self._store = store
        self._tag = listener_tag
        self._reads: dict[str, asyncio.Task[None]] = {}  # id -> the read of its newest version
        self._tasks: set[asyncio.Task[None]] = set()

    async def load(self) -> datetime | None:
        """Read the whole catalogue (at start, and when the listener is back); return the
        database's time of the read (None: the catalogue is empty)."""
        rows = await self._store.personas()
        catalogue = self.catalogue
        seen = set()
        for row in rows:
            persona = self._parse(row)
            if persona is not None:
                catalogue.put(persona)
                seen.add(persona.id)
        for persona_id in [p for p in catalogue.ids() if p not in seen]:
            catalogue.removed(persona_id)
        log.info(
            "persona catalogue: %d personas, %d enabled", len(catalogue), len(catalogue.listing())
        )
        return rows[0]["read_at"] if rows else None

    def fresh(self, persona_id: str) -> bool:
        return self.catalogue.fresh(persona_id)

    async def refresh(self, persona_id: str) -> None:
        """Read the persona again: it was edited (one read serves every reply waiting for it),
        or edits may have been missed while the listener was down (then each reply reads)."""
        if not self.catalogue.trusted:
            await self._read(persona_id)
            return
        read = self._reads.get(persona_id)
        if read is None:
            read = self._reads[persona_id] = asyncio.create_task(self._read(persona_id))
            read.add_done_callback(lambda _task: self._reads.pop(persona_id, None))
        await asyncio.shield(read)

    # ------------------------------------------------------------------ the listener

    def notified(self, payload: str) -> None:
        """A `persona_catalogue` notification (from the listener's callback)."""
        change = parse_catalogue_change(payload)
        if change is None:
            log.warning("ignored a malformed %s notification", CATALOGUE_CHANNEL)
            return
        if change.removed:
            self.catalogue.removed(change.id)
            self._spawn(self._confirm(change.id, change.version))
        elif self.catalogue.notified(change.id, change.version):
            self._spawn(self._apply(change))
        else:
            self._spawn(self._confirm(change.id, change.version))

    def listener_changed(self, up: bool) -> None:
        """Down: edits may be missed, so every persona is read before use. Up: read them all."""
        if not up:
            self.catalogue.trusted = False
            return
        self._spawn(self._reload())

    async def _reload(self) -> None:
        attempt = 0
        while True:
            try:
                read_at = await self.load()
            except Exception as exc:  # the database is down too: try again
                log.warning("persona catalogue: reading it again failed: %s", exc)
                await asyncio.sleep(RETRY_S[min(attempt, len(RETRY_S) - 1)])
                attempt += 1
                continue
            self.catalogue.trusted = True
            if read_at is not None:  # edits made while the listener was down are in it
                await self._send_ack(
                    {"id": RELOADED, "read_at": read_at.isoformat(), "listener": self._tag}
                )
            return

    async def _apply(self, change: CatalogueChange) -> None:
        """Read the edited persona (again, while that fails), then confirm its version."""
        attempt = 0
        while self.catalogue.stale(change.id):
            try:
                await self.refresh(change.id)
            except Exception as exc:
                log.warning("persona catalogue: reading %r again failed: %s", change.id, exc)
                await asyncio.sleep(RETRY_S[min(attempt, len(RETRY_S) - 1)])
                attempt += 1
        persona = self.catalogue.get(change.id)
        await self._confirm(change.id, change.version if persona is None else persona.version)

    async def _read(self, persona_id: str) -> None:
        row = await self._store.persona(persona_id)
        persona = self._parse(row) if row is not None else None
        if persona is None:
            self.catalogue.removed(persona_id)
        else:
            self.catalogue.put(persona)

    async def _confirm(self, persona_id: str, version: int) -> None:
        await self._send_ack({"id": persona_id, "version": version, "listener": self._tag})

    async def _send_ack(self, payload: dict[str, Any]) -> None:
        try:
            await self._store.notify(ACK_CHANNEL, orjson.dumps(payload).decode())
        except Exception as exc:
            log.warning("persona catalogue: confirming %s failed: %s", payload["id"], exc)

    def _parse(self, row: asyncpg.Record) -> Persona | None:
        try:
            return persona_from_row(row)
        except CardError as exc:
            log.warning("persona %r is left out: its stored card is not valid: %s", row["id"], exc)
            return None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        for task in (*self._tasks, *self._reads.values()):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._reads.values(), return_exceptions=True)


# ---------------------------------------------------------------------- the editor's side


class Confirmations:
    """The editor's side: the confirmations of the processes, heard from before the edit.

    A process confirms an edit it was notified of with its id and version. A process whose
    listener (re)connected after the edit was never notified of it: it reads the whole
    catalogue instead, and confirms that with the id "*" and the database's time of the read,
    which confirms every edit committed before then."""

    def __init__(self) -> None:
        self._heard: list[tuple[str, int, str]] = []  # (id, version, listener)
        self._reloads: dict[str, datetime] = {}  # listener -> its newest whole read
        self._since: datetime | None = None  # the edits waited for committed before this
        self._changed = asyncio.Event()

    def heard(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            data = orjson.loads(str(payload))
            who = str(data["listener"])
            if data["id"] == RELOADED:
                read_at = datetime.fromisoformat(str(data["read_at"]))
                self._reloads[who] = max(read_at, self._reloads.get(who, read_at))
            else:
                self._heard.append((str(data["id"]), int(data["version"]), who))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return
        self._changed.set()

    def confirmed(self, persona_id: str, version: int) -> set[str]:
        found = {who for pid, v, who in self._heard if pid == persona_id and v >= version}
        since = self._since
        if since is not None:
            found |= {who for who, read_at in self._reloads.items() if read_at > since}
        return found

    async def wait(
        self, conn: asyncpg.Connection, changes: Iterable[tuple[str, int]], timeout_s: float
    ) -> list[str]:
        """Wait until every process listening now has confirmed each (id, version); return the
        listeners that did not within `timeout_s` (empty: the edit is everywhere)."""
        wanted = list(changes)
        self._since = await conn.fetchval("SELECT clock_timestamp()")  # after the commit
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            # asked again each time: a process that stopped is no longer waited for, one that
            # started (or whose listener is back) is, and confirms with its whole read
            listeners = set(await listening_processes(conn))
            missing = {
                who
                for who in listeners
                if any(who not in self.confirmed(pid, version) for pid, version in wanted)
            }
            if not missing:
                return []
            remaining = deadline - loop.time()
            if remaining <= 0:
                return sorted(missing)
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, RECHECK_S))


async def listening_processes(conn: asyncpg.Connection) -> list[str]:
    """The tags of the server processes whose listener is connected to this database."""
    rows = await conn.fetch(
        "SELECT application_name FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name LIKE $1",
        f"{APPLICATION_NAME}:%",
    )
    return [row["application_name"].partition(":")[2] for row in rows]


@asynccontextmanager
async def confirmations(conn: asyncpg.Connection) -> AsyncIterator[Confirmations]:
    """Listen for confirmations on `conn` (before the edit's transaction begins on it)."""
    heard = Confirmations()
    await conn.add_listener(ACK_CHANNEL, heard.heard)
    try:
        yield heard
    finally:
        await conn.remove_listener(ACK_CHANNEL, heard.heard)
