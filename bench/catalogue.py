"""`python -m bench.catalogue`: what the persona catalogue costs (issue 15).

Two servers side by side, each on its own embedded PostgreSQL: one whose catalogue holds the six
built-in personas, one with 5,000 (the six and 4,994 imported cards). It prints:
- the chat path with each, alternating, under the lean load client (50 connections, a switch
  every 5 chats): chats/s, p99, server and PostgreSQL CPU per chat, medians of --repeats runs;
- memory per cached card: the RSS of the fresh 5,000-persona process less the 6-persona one's,
  over the 4,994 cards between them (and the welcome frame's size with each catalogue);
- the propagation of an edit to other processes: a second process joins the big catalogue's
  database, and --edits edits (each a new version of one card, notified as `run.py personas`
  does) are timed from their commit to each process's confirmation, p50/p99/max, under load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from bench.lean import close_all, closed_loop, connect, percentile_ms, raise_fd_limit
from bench.procs import Proc, postgres_cpu_seconds, postgres_dsn, start_chat
from bench.tokens import signer

ACK_CHANNEL = "persona_catalogue_ack"  # server/catalogue.py (bench imports no server code)


def card(index: int, version: int = 1) -> dict[str, Any]:
    """An imported card of a realistic size (~1.5 KB), with template material."""
    name = f"Bench Persona {index}"
    return {
        "spec": "chara_card_v3",
        "spec_version": "3.0",
        "data": {
            "name": name,
            "description": f"{{{{char}}}} is persona number {index} of a large catalogue, "
            "patient and curious, who likes long walks and short answers. " * 3,
            "personality": "curious, patient, dry",
            "scenario": "{{char}} and {{user}} talk in a quiet cafe.",
            "first_mes": f"Hello, I am {name}.",
            "mes_example": "<START>\n{{user}}: Hi!\n{{char}}: Hello there, friend.",
            "system_prompt": "",
            "post_history_instructions": "Answer in two sentences.",
            "tags": ["bench"],
            "creator": "bench",
            "character_version": str(version),
            "extensions": {
                "persona_chat": {
                    "openers": [f"Hi, this is {name}.", "Oh, hello."],
                    "follow_ups": ["What else is new?", "And then?"],
                    "sign_off": f"Card version {version}.",
                }
            },
        },
    }


async def fill(dsn: str, count: int) -> None:
    """Add `count` personas to the catalogue (no notification: the server starts after)."""
    conn = await asyncpg.connect(dsn)
    try:
        ids = [f"bench-{index:05d}" for index in range(count)]
        cards = [orjson.dumps(card(index)).decode() for index in range(count)]
        await conn.execute(
            "INSERT INTO personas (id, name, description, spec, card)"
            " SELECT i, c->'data'->>'name', left(c->'data'->>'description', 1024), 'v3', c"
            " FROM unnest($1::text[], $2::json[]) AS t(i, c) ON CONFLICT (id) DO NOTHING",
            ids,
            cards,
        )
    finally:
        await conn.close()


async def chat_run(proc: Proc, clients: int, duration_s: float, secret: str) -> dict[str, Any]:
    users = [f"{proc.name}-{secrets.token_hex(3)}-{index}" for index in range(clients)]
    conns = await connect(proc.url, clients, False, signer(secret), users)
    counters: dict[str, float] = {}

    def snapshot(when: str) -> None:
        counters[f"server_{when}"] = proc.all_cpu_seconds()
        counters[f"postgres_{when}"] = postgres_cpu_seconds(proc.pgdata)

    try:
        tally, _ = await closed_loop(
            conns, duration_s, 5, lambda: snapshot("before"), lambda: snapshot("after")
        )
    finally:
        close_all(conns)
    replies = max(1, tally.replies)
    return {
        "chats_per_s": tally.in_window / duration_s,
        "p99_ms": percentile_ms(tally.latencies, 0.99),
        "server_us": (counters["server_after"] - counters["server_before"]) / replies * 1e6,
        "postgres_us": (counters["postgres_after"] - counters["postgres_before"]) / replies * 1e6,
        "stale": tally.stale,
        "errors": sum(tally.errors.values()),
    }


async def welcome_bytes(proc: Proc, secret: str) -> int:
    """The size of the welcome frame a new connection gets."""
    import websockets

    async with websockets.connect(proc.url, max_size=None) as ws:
        await ws.send(
            orjson.dumps({"type": "hello", "id": "w", "token": signer(secret)("w")}).decode()
        )
        return len(await ws.recv())


async def propagation(
    dsn: str, processes: int, edits: int, load: asyncio.Future[Any]
) -> dict[str, float]:
    """Edit one card `edits` times; time commit -> each process's confirmation."""
    conn = await asyncpg.connect(dsn)
    heard: dict[tuple[int, str], float] = {}

    def on_ack(_c: object, _pid: int, _channel: str, payload: object) -> None:
        data = orjson.loads(str(payload))
        if data["id"] == "bench-00001":
            heard.setdefault((int(data["version"]), str(data["listener"])), time.perf_counter())

    await conn.add_listener(ACK_CHANNEL, on_ack)
    samples: list[float] = []
    try:
        for edit in range(edits):
            async with conn.transaction():
                version = await conn.fetchval(
                    "UPDATE personas SET card = $2::json, version = version + 1,"
                    " updated_at = now() WHERE id = $1 RETURNING version",
                    "bench-00001",
                    orjson.dumps(card(1, edit + 2)).decode(),
                )
                payload = {"id": "bench-00001", "version": version, "removed": False}
                await conn.execute(
                    "SELECT pg_notify('persona_catalogue', $1)", orjson.dumps(payload).decode()
                )
            committed = time.perf_counter()
            deadline = committed + 5
            while time.perf_counter() < deadline:
                got = [at for (v, _), at in heard.items() if v == version]
                if len(got) >= processes:
                    samples += [(at - committed) * 1000 for at in got]
                    break
                await asyncio.sleep(0.0005)
            await asyncio.sleep(0.02)
    finally:
        await conn.close()
    await load
    ordered = sorted(samples)
    return {
        "edits": edits,
        "confirmations": len(samples),
        "p50_ms": statistics.median(ordered),
        "p99_ms": ordered[int(0.99 * (len(ordered) - 1))],
        "max_ms": ordered[-1],
    }


def median_of(runs: Sequence[dict[str, Any]], key: str) -> float:
    return float(statistics.median(run[key] for run in runs))


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    secret = secrets.token_hex(16)
    env = {
        "CHAT_RATE_PER_S": "100000",
        "CHAT_RATE_BURST": "100000",
        "CHAT_MAX_PREAUTH_PER_IP": "1000",
    }
    small = start_chat(workdir / "six", None, secret, env, name="six")
    big = start_chat(workdir / "many", None, secret, env, name="many")
    assert big.pgdata is not None
    await fill(postgres_dsn(big.pgdata), args.personas - 6)
    big.stop()
    big = start_chat(workdir / "many", None, secret, env, name="many")  # a fresh process
    procs = {"six": small, "many": big}
    report: dict[str, Any] = {"personas": args.personas}
    try:
        await asyncio.sleep(1.0)
        rss = {name: proc.rss_kib() for name, proc in procs.items()}
        report["rss_kib"] = rss
        report["bytes_per_card"] = (rss["many"] - rss["six"]) * 1024 / (args.personas - 6)
        report["welcome_bytes"] = {n: await welcome_bytes(p, secret) for n, p in procs.items()}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in procs}
        for repeat in range(args.repeats):
            for name in ("six", "many") if repeat % 2 == 0 else ("many", "six"):
                result = await chat_run(procs[name], args.clients, args.duration, secret)
                runs[name].append(result)
                print(f"  {name:>4} run {repeat + 1}: {json.dumps(result)}", flush=True)
        report["chat"] = {
            name: {key: median_of(found, key) for key in found[0]} for name, found in runs.items()
        }
        assert big.pgdata is not None
        second = Proc(
            "many-2",
            [sys.executable, "run.py", "serve", "--port", "0", "--log-level", "WARNING"],
            workdir / "many",
            None,
            {
                "CHAT_JWT_SECRET": secret,
                "CHAT_API_PORT": "0",
                "DATABASE_URL": postgres_dsn(big.pgdata),
            },
        )
        try:
            load = asyncio.ensure_future(chat_run(big, args.clients, args.edits * 0.03 + 2, secret))
            report["propagation"] = await propagation(postgres_dsn(big.pgdata), 2, args.edits, load)
        finally:
            second.stop()
    finally:
        for proc in procs.values():
            proc.stop()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.catalogue", description=__doc__)
    parser.add_argument("--personas", type=int, default=5000, help="the big catalogue (5000)")
    parser.add_argument("--clients", type=int, default=50, help="connections (50)")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per run (6)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each (3)")
    parser.add_argument("--edits", type=int, default=200, help="edits timed (200)")
    parser.add_argument("--json", type=Path, default=None, help="write the report here too")
    args = parser.parse_args(argv)
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="bench-catalogue-") as tmp:
        report = asyncio.run(run(args, Path(tmp)))
    chat = report["chat"]
    print(f"\ncatalogue of 6 vs {args.personas} personas, {args.clients} connections, medians:")
    for name in ("six", "many"):
        row = chat[name]
        print(
            f"  {name:>4}: {row['chats_per_s']:8.0f} chats/s  p99 {row['p99_ms']:6.1f} ms"
            f"  server {row['server_us']:6.1f} us/chat"
            f"  PostgreSQL {row['postgres_us']:5.1f} us/chat"
            f"  stale {row['stale']:.0f}  errors {row['errors']:.0f}"
        )
    ratio = chat["many"]["server_us"] / chat["six"]["server_us"]
    print(f"  server CPU per chat, many/six: {ratio:.3f}")
    print(
        f"memory per cached card: {report['bytes_per_card']:.0f} bytes"
        f" (RSS {report['rss_kib']['six']} KiB with 6, {report['rss_kib']['many']} KiB with"
        f" {args.personas}); welcome frame {report['welcome_bytes']['six']} and"
        f" {report['welcome_bytes']['many']} bytes"
    )
    prop = report["propagation"]
    print(
        f"an edit reaches another process (commit -> confirmed), {prop['confirmations']}"
        f" confirmations of {prop['edits']} edits under load: p50 {prop['p50_ms']:.2f} ms,"
        f" p99 {prop['p99_ms']:.2f} ms, max {prop['max_ms']:.2f} ms"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
