"""The store: the asyncpg pool, migrations, the group commits, and every query."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from importlib import resources

import asyncpg
import orjson

from protocol.conversation.records import (
    Avatar,
    PastMessage,
    PastTurn,
    StoredTurn,
    SwitchRequest,
    SwitchResult,
    Turn,
)
from protocol.errors import AvatarExists, InvalidPersona, Unavailable
from protocol.frames import HistoryEntry
from server.batching import Batcher, Done, StaleResource
from server.store.connections import (
    Conn,
    PoolConnection,
    avatar_or_none,
    ended_unsent,
    record,
    unreachable_is_unavailable,
    usable,
)
from server.store.statements import (
    AVATAR_COLUMNS,
    COMMIT_TURNS,
    COMMIT_TURNS_SKIPPING,
    SET_PERSONAS,
)

log = logging.getLogger("server.store")

PERSONA_COLUMNS = "id, card, version, enabled"
MIGRATION_LOCK_KEY = 0x70657273  # "pers": one advisory lock for every process that migrates
SWITCH_WAIT_S = 0.1  # how long a batch of turns may wait for a batch of switches being written


class Store:
    """The one place that speaks SQL. Every query is scoped by the authenticated user."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        timeout_s: float,
        on_batch: Callable[[int], object] | None = None,
    ) -> None:
        self._pool = pool
        self._timeout = timeout_s
        self._turns: Batcher[Conn, Turn, StoredTurn] = Batcher(
            self._write_turns,
            self._connection,
            name="turns",
            observe=on_batch,
            before_batch=self._switches_landed,
            usable=usable,
        )
        self._switches: Batcher[Conn, SwitchRequest, SwitchResult | None] = Batcher(
            self._commit_switches, self._connection, name="switches", usable=usable
        )
        self._loads: Batcher[Conn, str, Avatar | None] = Batcher(
            self._load_avatars, self._connection, name="avatars", usable=usable
        )

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        timeout_s: float = 5.0,
        on_batch: Callable[[int], object] | None = None,
    ) -> Store:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout_s,
            command_timeout=timeout_s,
            connection_class=PoolConnection,
        )
        return cls(pool, timeout_s, on_batch)

    async def close(self) -> None:
        await self.drain()
        await asyncio.wait_for(self._pool.close(), timeout=self._timeout)

    async def drain(self) -> None:
        """Wait until every switch and turn handed to the group commits has been flushed."""
        await self._switches.drain()
        await self._turns.drain()

    @property
    def pool_in_use(self) -> int:
        return self._pool.get_size() - self._pool.get_idle_size()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Conn]:
        """A pooled connection; unreachable-database errors become `Unavailable`."""
        with unreachable_is_unavailable():
            async with self._pool.acquire(timeout=self._timeout) as conn:
                with unreachable_is_unavailable(conn):
                    yield conn

    async def _fetch(self, conn: Conn, query: str, *args: object) -> list[asyncpg.Record]:
        """A batch's statement on the connection its batcher holds; unreachable-database errors
        become `Unavailable`, and a connection the database had already ended (nothing of the
        statement sent) `StaleResource`, so that the batch goes again on another."""
        with unreachable_is_unavailable(conn):
            try:
                return await conn.fetch(query, *args)
            except asyncpg.InternalClientError as exc:
                if not ended_unsent(exc, conn):
                    raise
                log.debug("a batch met a connection the database had ended; sent on another")
                unavailable = Unavailable("the database is unreachable; try again shortly")
                raise StaleResource(unavailable) from exc

    # ------------------------------------------------------------------ lifecycle

    async def migrate(self) -> list[str]:
        """Apply pending migrations under an advisory lock; return the names applied."""
        applied: list[str] = []
        async with self._connection() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
            try:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version int PRIMARY KEY, name text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
                done = {
                    r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")
                }
                for version, name, sql in _migration_files():
                    if version in done:
                        continue
                    async with conn.transaction():
                        await conn.execute(sql)
                        await conn.execute(
                            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                            version,
                            name,
                        )
                    log.info("applied migration %03d %s", version, name)
                    applied.append(name)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        return applied

    async def ping(self) -> bool:
        try:
            async with self._connection() as conn:
                await conn.fetchval("SELECT 1", timeout=min(self._timeout, 2.0))
        except Unavailable:
            return False
        return True

    # ------------------------------------------------------------------ users and avatars

    async def open_user(self, user_id: str) -> Avatar | None:
        """Create the user on first sight; return its avatar, if any."""
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "WITH new_user AS (INSERT INTO users (id) VALUES ($1) ON CONFLICT DO NOTHING)"
                f" SELECT {AVATAR_COLUMNS} FROM avatars WHERE user_id = $1",
                user_id,
            )
        return avatar_or_none(row)

    async def get_avatar(self, user_id: str) -> Avatar | None:
        """The user's avatar, read together with other sessions' reads."""
        return await self._loads.submit(user_id)

    async def _load_avatars(self, conn: Conn, user_ids: Sequence[str]) -> list[Avatar | None]:
        rows = await self._fetch(
            conn,
            f"SELECT {AVATAR_COLUMNS} FROM avatars WHERE user_id = ANY($1::text[])",
            list(set(user_ids)),
        )
        found = {row["user_id"]: record(Avatar, row) for row in rows}
        return [found.get(user_id) for user_id in user_ids]

    async def create_avatar(self, user_id: str, name: str, personality: str) -> Avatar:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "INSERT INTO avatars (user_id, name, personality) SELECT $1, $2, $3"
                " WHERE EXISTS (SELECT 1 FROM personas WHERE id = $3 AND enabled)"
                f" ON CONFLICT (user_id) DO NOTHING RETURNING {AVATAR_COLUMNS}",
                user_id,
                name,
                personality,
            )
            avatar = avatar_or_none(row)
            if avatar is None:
                allowed = await conn.fetchval(
                    "SELECT enabled FROM personas WHERE id = $1", personality
                )
                if not allowed:
                    raise InvalidPersona(f"the personality {personality!r} is not available now")
                raise AvatarExists()
        return avatar

    # ------------------------------------------------------------------ the persona catalogue

    async def personas(self) -> list[asyncpg.Record]:
        """The catalogue's rows, in catalogue order, with the database's time of the read."""
        async with self._connection() as conn:
            return list(
                await conn.fetch(
                    f"SELECT {PERSONA_COLUMNS}, now() AS read_at FROM personas"
                    " ORDER BY created_at, id"
                )
            )

    async def persona(self, persona_id: str) -> asyncpg.Record | None:
        """One persona's row (an edit was notified, or edits may have been missed): by its
        key, not by a statement that a generic plan would answer with a scan."""
        async with self._connection() as conn:
            row: asyncpg.Record | None = await conn.fetchrow(
                f"SELECT {PERSONA_COLUMNS} FROM personas WHERE id = $1", persona_id
            )
            return row

    async def notify(self, channel: str, payload: str) -> None:
        async with self._connection() as conn:
            await conn.execute("SELECT pg_notify($1, $2)", channel, payload)

    def add_switch(self, switch: SwitchRequest, done: Done[SwitchResult | None]) -> None:
        """Commit a new personality, batched with other sessions' switches (group commit);
        `done` gets the avatar as committed and the personality it replaced, None when the
        user has no avatar, or the error. The statement notifies `persona_changed` on commit."""
        self._switches.add(switch, done)

    async def _commit_switches(
        self, conn: Conn, switches: Sequence[SwitchRequest]
    ) -> list[SwitchResult | BaseException | None]:
        rows = await self._fetch(
            conn,
            SET_PERSONAS,
            [switch.user_id for switch in switches],
            [switch.personality for switch in switches],
            switches[0].origin,
        )
        results: list[SwitchResult | BaseException | None] = [None] * len(switches)
        for row in rows:
            if row["refused"]:
                results[row["ord"] - 1] = InvalidPersona(
                    f"the personality {row['personality']!r} is not available now"
                )
                continue
            avatar = record(Avatar, row)
            results[row["ord"] - 1] = SwitchResult(avatar, row["previous"], row["newest"])
        return results

    # ------------------------------------------------------------------ messages

    async def _switches_landed(self) -> None:
        """Before a batch of turns is taken: while switches are queued or being written, wait
        (briefly) for their answers. Their sessions hand in the chats read behind them as soon
        as they are answered (a chat behind a switch is written only after it), so those join
        this batch of turns instead of the next: half as many statements per chat at 50
        clients."""
        answered = self._switches.next_hand_out()
        if answered is not None:
            await asyncio.wait([answered], timeout=SWITCH_WAIT_S)

    def add_turn(self, turn: Turn, done: Done[StoredTurn]) -> None:
        """Write a chat and its reply durably, batched with other sessions' turns; `done` gets
        where they were stored (or that the chat was stored already), or the error."""
        self._turns.add(turn, done)

    async def _write_turns(
        self, conn: Conn, turns: Sequence[Turn]
    ) -> list[StoredTurn | BaseException]:
        try:
            data = orjson.dumps(turns).decode()
            try:
                rows = await self._fetch(conn, COMMIT_TURNS, data)
            except asyncpg.UniqueViolationError as exc:
                # Nothing of the batch was written; again, keeping the chats already stored.
                log.debug(
                    "a batch of %d turns met a stored chat (%s); written again", len(turns), exc
                )
                rows = await self._fetch(conn, COMMIT_TURNS_SKIPPING, data)
        except (asyncpg.DataError, TypeError) as exc:
            if len(turns) == 1:
                raise
            # A value that cannot be stored (or encoded) fails the whole statement: each turn
            # is written alone, so that only its own chat fails (a bug: it is logged there).
            log.warning(
                "a batch of %d turns was refused (%s); each is written alone", len(turns), exc
            )
            return [await self._write_alone(conn, turn) for turn in turns]
        return [StoredTurn(row[1], row[2], row[3]) for row in rows]  # (ord, ids, inserted)

    async def _write_alone(self, conn: Conn, turn: Turn) -> StoredTurn | BaseException:
        try:
            return (await self._write_turns(conn, [turn]))[0]
        except (asyncpg.DataError, TypeError) as exc:
            return exc

    async def recent_chat_ids(self, user_id: str, limit: int) -> list[str]:
        """The client ids of the user's `limit` newest chats that have one."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT client_id FROM messages WHERE user_id = $1 AND role = 'user'"
                " AND client_id IS NOT NULL ORDER BY id DESC LIMIT $2",
                user_id,
                limit,
            )
        return [row["client_id"] for row in reversed(rows)]

    async def find_turn(self, user_id: str, client_id: str) -> PastTurn | None:
        """The stored chat with this client id, with its reply."""
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT u.id AS message_id, u.text AS user_text, a.id AS reply_id, a.persona,"
                " a.text AS reply_text, a.status"
                " FROM messages u JOIN messages a ON a.reply_to = u.id"
                " WHERE u.user_id = $1 AND u.client_id = $2 AND u.role = 'user'",
                user_id,
                client_id,
            )
        return None if row is None else record(PastTurn, row)

    async def reserve_message_ids(self) -> tuple[int, int]:
        """Two fresh ids (the chat's, the reply's) for a reply that streams before it commits."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT nextval('messages_id_seq') AS id FROM generate_series(1, 2)"
            )
        first, second = sorted(int(r["id"]) for r in rows)
        return first, second

    async def recent_messages(
        self, user_id: str, max_messages: int, max_chars: int
    ) -> list[PastMessage]:
        """The newest completed messages, oldest first, within a count and a character budget."""
        if max_messages <= 0:
            return []
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT role, persona, text FROM messages"
                " WHERE user_id = $1 AND status = 'completed'"
                " ORDER BY id DESC LIMIT $2",
                user_id,
                max_messages,
            )
        picked: list[PastMessage] = []
        used = 0
        for row in rows:
            used += len(row["text"])
            if used > max_chars:
                break
            picked.append(PastMessage(row["role"], row["text"], row["persona"]))
        picked.reverse()
        return picked

    async def history(self, user_id: str, limit: int, before: int | None) -> list[HistoryEntry]:
        """The user's messages, oldest first: the `limit` newest ones older than `before`."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT id, role, persona, text, created_at, status, error_code FROM messages"
                " WHERE user_id = $1 AND ($2::bigint IS NULL OR id < $2)"
                " ORDER BY id DESC LIMIT $3",
                user_id,
                before,
                limit,
            )
        return [
            HistoryEntry(
                id=r["id"],
                role=r["role"],
                persona=r["persona"],
                text=r["text"],
                created_at=r["created_at"],
                status=r["status"],
                error=r["error_code"],
            )
            for r in reversed(rows)
        ]


async def migrate_database(dsn: str, timeout_s: float) -> list[str]:
    """Apply pending migrations with a short-lived pool; return the names applied."""
    store = await Store.connect(dsn, min_size=1, max_size=1, timeout_s=timeout_s)
    try:
        return await store.migrate()
    finally:
        await store.close()


def _migration_files() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every `NNN_name.sql` in server/migrations, in order."""
    found = []
    for entry in resources.files("server.migrations").iterdir():
        if entry.name.endswith(".sql"):
            stem = entry.name.removesuffix(".sql")
            number, _, name = stem.partition("_")
            found.append((int(number), name, entry.read_text(encoding="utf-8")))
    return sorted(found)
