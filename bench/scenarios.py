"""The measured scenarios: closed-loop chat load, and the memory of idle connections."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any

import asyncpg

from bench.procs import Proc, postgres_dsn
from bench.tokens import signer
from clients.bots.load import MAX_CHATS_PER_S_PER_BOT, LoadConfig, run_load
from clients.bots.plan import BotPlan, Mode
from clients.bots.report import Stats

CONNECT_CONCURRENCY = 200
WARMUP_CLIENTS = 20


@dataclass(frozen=True, slots=True)
class Target:
    """One server under load: its process and how the bots speak to it."""

    name: str  # "echo" or "server"
    proc: Proc
    mode: Mode
    secret: str = ""


def load_config(
    target: Target, clients: int, duration_s: float, switch_every: int, chat: bool = True
) -> LoadConfig:
    """The same bots for both servers; only the echo server gets no handshake and no switches."""
    protocol = target.mode is Mode.PROTOCOL
    plan = BotPlan(
        url=target.proc.url,
        mode=target.mode,
        switch_every=switch_every if protocol else 0,
        chat=chat,
        answer_timeout_s=60.0,
        open_timeout_s=60.0,
        max_chats=math.ceil(duration_s * MAX_CHATS_PER_S_PER_BOT) + 1,
    )
    return LoadConfig(
        plan=plan,
        clients=clients,
        duration_s=duration_s,
        ramp_s=clients / 1000.0,
        token_for=signer(target.secret) if target.secret else None,
        connect_concurrency=CONNECT_CONCURRENCY,
    )


async def chat_load(
    target: Target, clients: int, duration_s: float, switch_every: int
) -> dict[str, Any]:
    """One closed-loop run: every bot chats for `duration_s`; the bots' report, with the CPU
    time the server process, its PostgreSQL and the load client spent per reply."""
    server_before, pg_before = target.proc.cpu_seconds()
    client_before = time.process_time()  # the bots run in this process
    report = await run_load(load_config(target, clients, duration_s, switch_every))
    client_after = time.process_time()
    server_after, pg_after = target.proc.cpu_seconds()
    replies = max(1, int(report["totals"]["replies"]))
    report["cpu_us_per_reply"] = {
        "server": round((server_after - server_before) / replies * 1e6, 1),
        "postgres": round((pg_after - pg_before) / replies * 1e6, 1),
        "client": round((client_after - client_before) / replies * 1e6, 1),
    }
    return report


async def warm_up(target: Target, switch_every: int) -> None:
    """A short run so that the first measured run pays no first-call costs."""
    await run_load(load_config(target, WARMUP_CLIENTS, 0.5, switch_every))


async def idle_memory(
    target: Target, clients: int, hold_s: float, settle_s: float
) -> dict[str, Any]:
    """RSS per idle connection: the server's VmRSS before and after `clients` connections open.

    On this server each bot authenticates (and creates its avatar), then idles; on the echo
    server each bot only connects. All of them hold for `hold_s`, then ping once.
    """
    await run_load(load_config(target, WARMUP_CLIENTS, 0.1, 0, chat=False))
    await asyncio.sleep(settle_s)
    before = target.proc.rss_kib()
    stats = Stats()
    measured: dict[str, int] = {}

    async def measure() -> None:
        await asyncio.sleep(settle_s)
        measured["after_kib"] = target.proc.rss_kib()
        measured["ready"] = stats.ready

    report = await run_load(load_config(target, clients, hold_s, 0, chat=False), stats, measure)
    after = measured["after_kib"]
    return {
        "server": target.name,
        "connections": clients,
        "ready": measured["ready"],
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_connection": round((after - before) / max(1, measured["ready"]), 2),
        "pongs": report["totals"]["pongs"],
        "errors": report["errors"],
        "hold_s": hold_s,
    }


async def database_facts(proc: Proc) -> dict[str, Any]:
    """Durability settings of the embedded PostgreSQL and how many replies it holds."""
    if proc.pgdata is None:
        return {}
    conn = await asyncpg.connect(postgres_dsn(proc.pgdata), timeout=10)
    try:
        facts: dict[str, Any] = {
            name: await conn.fetchval(f"SHOW {name}")
            for name in ("fsync", "synchronous_commit", "wal_sync_method")
        }
        try:
            facts["stored_completed_replies"] = await conn.fetchval(
                "SELECT count(*) FROM messages WHERE role = 'assistant' AND status = 'completed'"
            )
        except asyncpg.PostgresError as exc:
            facts["stored_completed_replies"] = f"unknown ({exc.__class__.__name__})"
        return facts
    finally:
        await conn.close()
