"""The catalogue's editor (`run.py personas`): its statements and operations, on one connection.

Every edit bumps the persona's version and notifies `persona_catalogue` in the transaction that
makes it; the editor then waits until every server process listening to the database has
confirmed it (server/catalogue.py), so that once an edit is reported done, no reply is rendered
with the old card. `remove --reassign` moves the avatars that use a persona to another one as
persona switches (`persona_changed`, origin "cli"), under a lock of the avatars table that keeps
concurrent switches out until it commits (migration 004). The operations return results and
raise `AdminError` (one line) for what cannot be done; printing is server/personas_cli.py's.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

import asyncpg

from protocol.cards import CardError, ParsedCard, is_slug, parse_card
from server.catalogue import CatalogueChange, change_payload, confirmations
from server.notify import CATALOGUE_CHANNEL
from server.notify import CHANNEL as SWITCH_CHANNEL

ORIGIN = "cli"  # the origin of the switches a reassignment makes: no server process skips them
NAME_CHARS = 256  # the personas table's limits on the copies it keeps for listings
DESCRIPTION_CHARS = 1024


class AdminError(Exception):
    """An operation that cannot be done, said in one line; nothing was written."""


@dataclass(frozen=True, slots=True)
class PersonaSummary:
    """A row of `list`."""

    id: str
    name: str
    version: int
    enabled: bool
    avatars: int


@dataclass(frozen=True, slots=True)
class StoredPersona:
    """A persona as the catalogue holds it, with its card parsed."""

    id: str
    name: str
    description: str
    spec: str
    version: int
    enabled: bool
    avatars: int
    created_at: datetime
    updated_at: datetime
    card: ParsedCard  # its id and enabled flag are the row's


@dataclass(frozen=True, slots=True)
class Outcome:
    """How every server process took the edits: the listeners that confirmed all of them, and
    those that did not within the timeout."""

    confirmed: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Imported:
    """One card of an import: where it came from and what it became (or would become)."""

    source: str
    id: str
    name: str
    spec: str
    action: Literal["create", "replace"]
    version: int  # the version it has (dry run: would have)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ImportResult:
    imported: tuple[Imported, ...]
    dry_run: bool
    outcome: Outcome = field(default_factory=Outcome)


@dataclass(frozen=True, slots=True)
class EnableResult:
    id: str
    enabled: bool
    version: int
    changed: bool  # False: it was so already (nothing written, nothing to confirm)
    outcome: Outcome = field(default_factory=Outcome)


@dataclass(frozen=True, slots=True)
class RemoveResult:
    id: str
    reassigned_to: str | None
    users: tuple[str, ...]  # the users whose avatar was moved
    outcome: Outcome = field(default_factory=Outcome)


# ------------------------------------------------------------------------------ reading


async def check_schema(conn: asyncpg.Connection) -> None:
    """AdminError when the database has no catalogue yet (its migrations were not applied)."""
    if await conn.fetchval("SELECT to_regclass('personas') IS NULL"):
        raise AdminError(
            "this database has no personas table yet: run `python run.py migrate` (or start the "
            "server once) first"
        )


async def list_personas(conn: asyncpg.Connection) -> list[PersonaSummary]:
    """Every persona, in catalogue order, with how many avatars use it."""
    rows = await conn.fetch(
        "SELECT p.id, p.name, p.version, p.enabled, coalesce(a.n, 0) AS avatars"
        " FROM personas p LEFT JOIN"
        "  (SELECT personality, count(*) AS n FROM avatars GROUP BY personality) a"
        "  ON a.personality = p.id"
        " ORDER BY p.created_at, p.id"
    )
    return [
        PersonaSummary(r["id"], r["name"], int(r["version"]), bool(r["enabled"]), r["avatars"])
        for r in rows
    ]


async def get_persona(conn: asyncpg.Connection, persona_id: str) -> StoredPersona:
    row = await conn.fetchrow(
        "SELECT p.*, (SELECT count(*) FROM avatars a WHERE a.personality = p.id) AS avatars"
        " FROM personas p WHERE p.id = $1",
        persona_id,
    )
    if row is None:
        raise AdminError(_no_such(persona_id))
    card = row["card"]
    try:
        parsed = parse_card(json.loads(card) if isinstance(card, str | bytes) else card)
    except CardError as exc:
        raise AdminError(f"{persona_id}: its stored card is not valid: {exc}") from None
    return StoredPersona(
        id=row["id"],
        name=row["name"],
        description=row["description"],
        spec=row["spec"],
        version=int(row["version"]),
        enabled=bool(row["enabled"]),
        avatars=int(row["avatars"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        card=replace(parsed, id=row["id"], enabled=bool(row["enabled"])),
    )


def _no_such(persona_id: str) -> str:
    return f"{persona_id}: no such persona (see `run.py personas list`)"


# ------------------------------------------------------------------------------ editing


@asynccontextmanager
async def _edit(
    conn: asyncpg.Connection, timeout_s: float, changes: list[CatalogueChange], out: list[Outcome]
) -> AsyncIterator[None]:
    """Run the body in one transaction (it appends the catalogue changes it makes to `changes`
    and notifies them), then wait for every server process to confirm them into `out`."""
    async with confirmations(conn) as heard:
        async with conn.transaction():
            yield
            for change in changes:
                await conn.execute(
                    "SELECT pg_notify($1, $2)", CATALOGUE_CHANNEL, change_payload(change)
                )
        if not changes:
            out.append(Outcome())
            return
        wanted = [(c.id, c.version) for c in changes]
        try:
            missing = await heard.wait(conn, wanted, timeout_s)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise AdminError(
                "the edit is committed, but waiting for the server processes to confirm it "
                f"failed: {' '.join(str(exc).split()) or type(exc).__name__}"
            ) from None
        everyone = set.intersection(*(heard.confirmed(pid, v) for pid, v in wanted))
        out.append(Outcome(tuple(sorted(everyone - set(missing))), tuple(missing)))


def target_id(parsed: ParsedCard, chosen: str | None) -> str:
    """The id an imported card gets: `--id`, else the file's id, else a slug of its name."""
    if chosen is not None:
        if not is_slug(chosen):
            raise AdminError(
                f"--id {chosen!r}: expected a slug: 1-64 characters of a-z, 0-9, _ and -, "
                "starting with a letter or a digit"
            )
        return chosen
    return parsed.persona_id


def written(parsed: ParsedCard) -> dict[str, Any]:
    """The card as it was written (unknown fields and extensions too), to be stored."""
    return parsed.card.model_dump(mode="json", exclude_unset=True)


async def import_cards(
    conn: asyncpg.Connection,
    cards: Sequence[tuple[str, ParsedCard]],
    *,
    chosen_id: str | None = None,
    replace_existing: bool = False,
    dry_run: bool = False,
    timeout_s: float = 5.0,
) -> ImportResult:
    """Import (source, card) pairs in one transaction: all of them, or (AdminError) none.

    A new persona is enabled unless its project card file says otherwise; `--replace` keeps a
    persona's enabled flag and created time, and bumps its version."""
    if chosen_id is not None and len(cards) != 1:
        raise AdminError("--id names the persona of one file: import the others without it")
    targets: dict[str, str] = {}
    plan: list[tuple[str, str, ParsedCard]] = []
    for source, parsed in cards:
        persona_id = target_id(parsed, chosen_id)
        if persona_id in targets:
            raise AdminError(
                f"{source}: the id {persona_id} is also the id of {targets[persona_id]}: give "
                "one of them another id (import it alone with --id)"
            )
        targets[persona_id] = source
        plan.append((source, persona_id, parsed))
    if dry_run:
        return ImportResult(
            tuple([await _check_one(conn, *p, replace_existing) for p in plan]), True
        )
    results: list[Imported] = []
    changes: list[CatalogueChange] = []
    out: list[Outcome] = []
    async with _edit(conn, timeout_s, changes, out):
        for source, persona_id, parsed in plan:
            item = await _import_one(conn, source, persona_id, parsed, replace_existing)
            results.append(item)
            changes.append(CatalogueChange(item.id, item.version))
    return ImportResult(tuple(results), False, out[0])


async def _check_one(
    conn: asyncpg.Connection, source: str, persona_id: str, parsed: ParsedCard, replacing: bool
) -> Imported:
    version = await conn.fetchval("SELECT version FROM personas WHERE id = $1", persona_id)
    if version is not None and not replacing:
        raise AdminError(_taken(source, persona_id))
    action: Literal["create", "replace"] = "create" if version is None else "replace"
    return Imported(
        source, persona_id, parsed.name, parsed.spec, action, 1 if version is None else version + 1,
        parsed.notes,
    )  # fmt: skip


def _taken(source: str, persona_id: str) -> str:
    return (
        f"{source}: the id {persona_id} is taken by another persona: choose another with --id, "
        "or overwrite it with --replace"
    )


async def _import_one(
    conn: asyncpg.Connection, source: str, persona_id: str, parsed: ParsedCard, replacing: bool
) -> Imported:
    card = json.dumps(written(parsed), ensure_ascii=False)
    values = (
        persona_id,
        parsed.name[:NAME_CHARS],
        parsed.data.description[:DESCRIPTION_CHARS],
        parsed.spec,
        card,
        parsed.enabled,
    )
    insert = (
        "INSERT INTO personas (id, name, description, spec, card, enabled)"
        " VALUES ($1, $2, $3, $4, $5::json, $6)"
    )
    if replacing:
        row = await conn.fetchrow(
            insert + " ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name,"
            " description = EXCLUDED.description, spec = EXCLUDED.spec, card = EXCLUDED.card,"
            " version = personas.version + 1, updated_at = now()"
            " RETURNING version, (xmax = 0) AS inserted",
            *values,
        )
    else:
        row = await conn.fetchrow(
            insert + " ON CONFLICT (id) DO NOTHING RETURNING version, true AS inserted", *values
        )
        if row is None:
            raise AdminError(_taken(source, persona_id))
    assert row is not None
    return Imported(
        source, persona_id, parsed.name, parsed.spec,
        "create" if row["inserted"] else "replace", int(row["version"]), parsed.notes,
    )  # fmt: skip


async def set_enabled(
    conn: asyncpg.Connection, persona_id: str, enabled: bool, timeout_s: float = 5.0
) -> EnableResult:
    """Enable or disable a persona (a new version), unless it is so already."""
    changes: list[CatalogueChange] = []
    out: list[Outcome] = []
    async with _edit(conn, timeout_s, changes, out):
        row = await conn.fetchrow(
            "SELECT version, enabled FROM personas WHERE id = $1 FOR UPDATE", persona_id
        )
        if row is None:
            raise AdminError(_no_such(persona_id))
        version = int(row["version"])
        if row["enabled"] != enabled:
            version = await conn.fetchval(
                "UPDATE personas SET enabled = $2, version = version + 1, updated_at = now()"
                " WHERE id = $1 RETURNING version",
                persona_id,
                enabled,
            )
            changes.append(CatalogueChange(persona_id, version))
    return EnableResult(persona_id, enabled, version, bool(changes), out[0])


async def remove(
    conn: asyncpg.Connection, persona_id: str, reassign: str | None = None, timeout_s: float = 5.0
) -> RemoveResult:
    """Remove a persona. Avatars that use it are moved to `reassign` (an enabled persona) as
    persona switches their users' sessions are told of; without it, AdminError when any does."""
    if reassign == persona_id:
        raise AdminError(f"--reassign {reassign}: name another persona than the one removed")
    changes: list[CatalogueChange] = []
    out: list[Outcome] = []
    users: list[str] = []
    async with _edit(conn, timeout_s, changes, out):
        # Switches and new avatars take ROW EXCLUSIVE on avatars: this waits for those under
        # way and holds off the others until the commit, when they see the persona gone.
        await conn.execute("LOCK TABLE avatars IN SHARE ROW EXCLUSIVE MODE")
        version = await conn.fetchval(
            "SELECT version FROM personas WHERE id = $1 FOR UPDATE", persona_id
        )
        if version is None:
            raise AdminError(_no_such(persona_id))
        using = await conn.fetchval(
            "SELECT count(*) FROM avatars WHERE personality = $1", persona_id
        )
        if using and reassign is None:
            raise AdminError(
                f"{persona_id}: {_avatars(using)} {'uses' if using == 1 else 'use'} it: move "
                "them to another persona with --reassign OTHER"
            )
        if reassign is not None:
            other = await conn.fetchrow(
                "SELECT enabled FROM personas WHERE id = $1 FOR SHARE", reassign
            )
            if other is None:
                raise AdminError(f"--reassign {reassign}: no such persona")
            if not other["enabled"]:
                raise AdminError(f"--reassign {reassign}: it is disabled: enable it first")
            moved = await conn.fetch(
                "WITH moved AS ("
                "  UPDATE avatars SET personality = $2, version = version + 1, updated_at = now()"
                "  WHERE personality = $1 RETURNING user_id, version)"
                " SELECT user_id, pg_notify($3, json_build_object('user_id', user_id,"
                "  'personality', $2::text, 'previous', $1::text, 'version', version,"
                "  'origin', $4::text)::text)"
                " FROM moved ORDER BY user_id",
                persona_id,
                reassign,
                SWITCH_CHANNEL,
                ORIGIN,
            )
            users = [row["user_id"] for row in moved]
        await conn.execute("DELETE FROM personas WHERE id = $1", persona_id)
        changes.append(CatalogueChange(persona_id, int(version) + 1, removed=True))
    return RemoveResult(persona_id, reassign, tuple(users), out[0])


def _avatars(n: int) -> str:
    return f"{n} avatar" if n == 1 else f"{n} avatars"
