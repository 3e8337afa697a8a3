"""`python -m bench.pg_rows`: where PostgreSQL's CPU per chat goes (issue 18), statement by
statement, on the server's own embedded PostgreSQL and schema.

One connection writes batches of turns in a loop, and the CPU time of its backend (psutil, the
backend's own counter) is divided by the turns written. The designs, alternating, medians of
--repeats:
- **two rows** (what the server writes today, server/store/statements.py `COMMIT_TURNS`): each
  turn is a user row and a reply row of `messages`, from one JSON array, with the ids the
  sequence gives and their four indexes (the primary key, `(user_id, id)`, the chat's client id,
  the reply's `reply_to`);
- **two rows by COPY**: the same rows with binary `COPY` (asyncpg's `copy_records_to_table`),
  their ids taken from the sequence first, in the same transaction;
- **one row**: each turn one row of a scratch table `bench_turns` (chat and reply text side by
  side, the id from the same sequence), with the indexes that the reads need: the primary key,
  `(user_id, id)` and the client id.

And the cost of a commit itself: `--batch` turns per transaction against one turn per
transaction, since a group commit's size decides how many commits a chat shares.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import orjson
import psutil

from bench.procs import postgres_dsn, start_chat

SCRATCH = """
CREATE TABLE IF NOT EXISTS bench_turns (
    id bigint PRIMARY KEY DEFAULT nextval('messages_id_seq'), user_id text NOT NULL,
    persona text NOT NULL, user_text text NOT NULL, reply_text text NOT NULL,
    status text NOT NULL, error_code text, client_id text,
    created_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX IF NOT EXISTS bench_turns_user_id_id ON bench_turns (user_id, id);
CREATE UNIQUE INDEX IF NOT EXISTS bench_turns_client_id ON bench_turns (user_id, client_id)
    WHERE client_id IS NOT NULL;
"""
COLUMNS = "user_id text, persona text, user_text text, reply_text text, status text, client_id text"
TWO_ROWS = f"""
WITH t AS MATERIALIZED (
    SELECT t.*, nextval('messages_id_seq') AS message_id, nextval('messages_id_seq') AS reply_id
    FROM json_to_recordset($1::json) AS t({COLUMNS}))
INSERT INTO messages (id, user_id, role, persona, text, status, client_id, reply_to)
SELECT m.* FROM t CROSS JOIN LATERAL (VALUES
    (t.message_id, t.user_id, 'user', t.persona, t.user_text, 'completed', t.client_id,
     NULL::bigint),
    (t.reply_id, t.user_id, 'assistant', t.persona, t.reply_text, t.status, NULL,
     t.message_id)) AS m
"""
ONE_ROW = f"""
INSERT INTO bench_turns (user_id, persona, user_text, reply_text, status, client_id)
SELECT * FROM json_to_recordset($1::json) AS t({COLUMNS})
"""
MESSAGE_COLUMNS = ["id", "user_id", "role", "persona", "text", "status", "client_id", "reply_to"]
USERS = 500


def turns(count: int, tag: str) -> list[dict[str, str]]:
    user_text = "Hello there, how was your day? Tell me something nice."
    reply_text = "Mine was lovely, thank you for asking! I spent it reading about the sea. " * 2
    return [
        {
            "user_id": f"bench-{i % USERS}",
            "persona": "witty",
            "user_text": user_text,
            "reply_text": reply_text,
            "status": "completed",
            "client_id": f"{tag}-{i}-{secrets.token_hex(4)}",
        }
        for i in range(count)
    ]


class Writer:
    """One connection; each design writes `batch` turns in one transaction."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.serial = 0

    def _batch(self, batch: int) -> list[dict[str, str]]:
        self.serial += 1
        return turns(batch, str(self.serial))

    async def two_rows(self, batch: int) -> None:
        await self.conn.execute(TWO_ROWS, orjson.dumps(self._batch(batch)).decode())

    async def one_row(self, batch: int) -> None:
        await self.conn.execute(ONE_ROW, orjson.dumps(self._batch(batch)).decode())

    async def two_rows_copy(self, batch: int) -> None:
        rows = self._batch(batch)
        async with self.conn.transaction():
            ids = await self.conn.fetch(
                "SELECT nextval('messages_id_seq') FROM generate_series(1, $1)", 2 * batch
            )
            records: list[tuple[object, ...]] = []
            for i, t in enumerate(rows):
                chat, reply = ids[2 * i][0], ids[2 * i + 1][0]
                records.append((chat, t["user_id"], "user", t["persona"], t["user_text"],
                                "completed", t["client_id"], None))  # fmt: skip
                records.append((reply, t["user_id"], "assistant", t["persona"], t["reply_text"],
                                t["status"], None, chat))  # fmt: skip
            await self.conn.copy_records_to_table(
                "messages", records=records, columns=MESSAGE_COLUMNS
            )


async def cpu_per_turn(
    backend: psutil.Process, write: Callable[[int], Awaitable[None]], batch: int, turns: int
) -> float:
    """µs of the backend's CPU per turn, over `turns` turns in batches of `batch`."""
    before = backend.cpu_times()
    for _ in range(max(1, turns // batch)):
        await write(batch)
    after = backend.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    return used / (max(1, turns // batch) * batch) * 1e6


async def measure(dsn: str, args: argparse.Namespace) -> None:
    conn = await asyncpg.connect(dsn)
    await conn.execute(SCRATCH)
    await conn.executemany(
        "INSERT INTO users (id) VALUES ($1) ON CONFLICT DO NOTHING",
        [(f"bench-{i}",) for i in range(USERS)],
    )
    backend = psutil.Process(await conn.fetchval("SELECT pg_backend_pid()"))
    writer = Writer(conn)
    designs = {
        "two rows (today)": writer.two_rows,
        "two rows by COPY": writer.two_rows_copy,
        "one row": writer.one_row,
    }
    figures: dict[str, list[float]] = {name: [] for name in designs}
    commits: dict[int, list[float]] = {1: [], args.batch: []}
    await writer.two_rows(args.batch)  # warm: plans, caches
    for rep in range(args.repeats):
        for name, write in designs.items():
            figures[name].append(await cpu_per_turn(backend, write, args.batch, args.turns))
        for batch in commits:
            turns_n = args.turns if batch > 1 else args.turns // 20
            commits[batch].append(await cpu_per_turn(backend, writer.two_rows, batch, turns_n))
        print(f"[rep {rep + 1}] " + "  ".join(f"{n}: {v[-1]:.1f} µs" for n, v in figures.items()))
    await conn.close()
    print(f"\nPostgreSQL CPU per turn, batches of {args.batch}, medians of {args.repeats}:")
    for name, values in figures.items():
        print(f"  {name:18} {statistics.median(values):7.1f} µs  (runs: "
              + ", ".join(f"{v:.1f}" for v in values) + ")")  # fmt: skip
    single, batched = (statistics.median(commits[b]) for b in commits)
    print(
        f"  one turn per transaction: {single:.1f} µs per turn; {args.batch} per transaction:"
        f" {batched:.1f} µs; a commit costs about {single - batched:.0f} µs of its own"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pg_rows", description=__doc__)
    parser.add_argument("--batch", type=int, default=100, help="turns per transaction (100)")
    parser.add_argument("--turns", type=int, default=20_000, help="turns per design and run")
    parser.add_argument("--repeats", type=int, default=5, help="runs to take medians of (5)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="persona-pg-rows-") as tmp:
        workdir = Path(tmp)
        server = start_chat(workdir, None, secrets.token_hex(16), {})
        try:
            assert server.pgdata is not None
            print(f"the server's embedded PostgreSQL: {server.pgdata}")
            asyncio.run(measure(postgres_dsn(server.pgdata), args))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
