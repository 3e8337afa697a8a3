"""`python -m bench.history_flood`: can one user's history requests hurt another user's chats?

One server (the embedded PostgreSQL, template replies, the default frame rate). A victim user
chats on 16 connections, a chat every 60 ms each, and its chat latency is measured twice,
side by side in one run, each time for a few seconds: alone, and while an attacker user floods
`history` (limit 100 over 16 KB messages) from 8 connections at the frame limit (20 frames/s
each). The server's history budget per user (`CHAT_HISTORY_BYTES_PER_S`, issue 17) is what
keeps the flood from costing everyone: the check is the victim's chat p99 with the flood at
most 2x its p99 without, median of the repetitions. `--budget` sets the server's budget
(bytes/s; a huge value shows the flood unchecked).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.procs import Cores, Proc, start_chat
from bench.tokens import signer
from clients.link import Link
from clients.loop import run_async

ATTACKER_CONNECTIONS = 8
VICTIM_CONNECTIONS = 16
VICTIM_PAUSE_S = 0.06  # a chatty person; enough samples for a steady p99
FRAME_INTERVAL_S = 0.05  # the attacker sends as fast as the frame limit lets it: 20 frames/s
STORED_MESSAGES = 100  # the attacker's history: 50 chats of 3,990 characters and their replies
BIG_TEXT = "x" * 3990


async def _login(url: str, token: str, prefix: str) -> Link:
    link = await Link.open(url, id_prefix=prefix)
    welcome = await link.request({"type": "hello", "token": token})
    if welcome["type"] != "welcome":
        raise RuntimeError(f"not welcomed: {welcome}")
    return link


async def _prepare(url: str, token_for: object, attacker: str, victim: str) -> None:
    """Both users get an avatar; the attacker gets a long history of 16 KB messages."""
    assert callable(token_for)
    for user in (attacker, victim):
        link = await _login(url, token_for(user), "p")
        await link.request({"type": "create_avatar", "name": "Ava", "personality": "witty"})
        if user == attacker:
            for index in range(STORED_MESSAGES // 2):
                await link.request({"type": "chat", "text": f"{index} {BIG_TEXT}"})
                await asyncio.sleep(FRAME_INTERVAL_S)
        await link.close()


async def _victim(links: list[Link], until: float) -> list[float]:
    async def chat(link: Link) -> list[float]:
        seen = []
        while time.monotonic() < until:
            started = time.perf_counter()
            answer = await link.request({"type": "chat", "text": "how was your day?"})
            if answer["type"] != "reply":
                raise RuntimeError(f"the victim's chat failed: {answer}")
            seen.append(time.perf_counter() - started)
            await asyncio.sleep(VICTIM_PAUSE_S)
        return seen

    return [s for batch in await asyncio.gather(*(chat(link) for link in links)) for s in batch]


async def _flood(links: list[Link], until: float) -> tuple[int, int, int]:
    """(pages served, requests refused rate_limited, bytes of history received)."""
    served = refused = received = 0

    async def ask(link: Link) -> None:
        nonlocal served, refused, received
        while time.monotonic() < until:
            answer = await link.request({"type": "history", "limit": 100})
            if answer["type"] == "history":
                served += 1
                received += sum(len(m["text"]) for m in answer["messages"])
            elif answer.get("code") == "rate_limited":
                refused += 1
            else:
                raise RuntimeError(f"unexpected answer to history: {answer}")
            await asyncio.sleep(FRAME_INTERVAL_S)

    await asyncio.gather(*(ask(link) for link in links))
    return served, refused, received


def _p99(samples: Sequence[float]) -> float:
    return statistics.quantiles(samples, n=100)[98] * 1000


async def measure(
    server: Proc, secret: str, seconds: float, repeats: int
) -> list[dict[str, float]]:
    url = server.url
    token_for = signer(secret)
    attacker, victim = f"attacker-{secrets.token_hex(3)}", f"victim-{secrets.token_hex(3)}"
    await _prepare(url, token_for, attacker, victim)
    victims = [await _login(url, token_for(victim), f"v{i}") for i in range(VICTIM_CONNECTIONS)]
    flooders = [
        await _login(url, token_for(attacker), f"a{i}") for i in range(ATTACKER_CONNECTIONS)
    ]
    rows = []
    try:
        await _victim(victims, time.monotonic() + 1.0)  # warm up
        for rep in range(repeats):
            cpu_before = server.cpu_seconds()[0]
            alone = await _victim(victims, time.monotonic() + seconds)
            cpu_alone = server.cpu_seconds()[0] - cpu_before
            until = time.monotonic() + seconds
            flooded, (served, refused, received) = await asyncio.gather(
                _victim(victims, until), _flood(flooders, until)
            )
            cpu_flooded = server.cpu_seconds()[0] - cpu_before - cpu_alone
            row = {
                "rep": rep + 1,
                "p99_alone_ms": _p99(alone),
                "p99_flooded_ms": _p99(flooded),
                "chats_alone": len(alone),
                "chats_flooded": len(flooded),
                "pages_served": served,
                "refused": refused,
                "history_mb_per_s": received / seconds / 1e6,
                "server_cpu_alone": cpu_alone / seconds,
                "server_cpu_flooded": cpu_flooded / seconds,
            }
            row["ratio"] = row["p99_flooded_ms"] / row["p99_alone_ms"]
            rows.append(row)
            print(
                f"rep {rep + 1}: victim chat p99 {row['p99_alone_ms']:.2f} ms alone,"
                f" {row['p99_flooded_ms']:.2f} ms flooded ({row['ratio']:.2f}x);"
                f" {served} pages served ({row['history_mb_per_s']:.2f} MB/s), {refused} refused;"
                f" server CPU {row['server_cpu_alone']:.0%} of a core alone,"
                f" {row['server_cpu_flooded']:.0%} flooded",
                flush=True,
            )
    finally:
        for link in (*victims, *flooders):
            await link.close()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.history_flood", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=int, help="the server's CHAT_HISTORY_BYTES_PER_S")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="persona-flood-"))
    secret = secrets.token_urlsafe(32)
    env = {"CHAT_RATE_PER_S": "20", "CHAT_RATE_BURST": "40"}  # the defaults, stated
    if args.budget is not None:
        env["CHAT_HISTORY_BYTES_PER_S"] = str(args.budget)
        env["CHAT_HISTORY_BURST_BYTES"] = str(max(args.budget * 8, 65536))
    cores = Cores.plan()
    server: Proc = start_chat(workdir, cores.server, secret, env)
    print(f"server at {server.url} ({cores.describe()}), settings {env}", flush=True)
    try:
        rows = run_async(measure(server, secret, args.seconds, args.repeats))
    finally:
        server.stop()
    ratio = statistics.median(row["ratio"] for row in rows)
    cpu = statistics.median(row["server_cpu_flooded"] for row in rows)
    print(f"median server CPU while flooded: {cpu:.0%} of a core")
    print(
        f"median over {len(rows)} repetitions: victim chat p99 with the flood {ratio:.2f}x"
        f" its p99 without (target <= 2x): {'met' if ratio <= 2 else 'NOT met'}"
    )
    return 0 if ratio <= 2 else 1


if __name__ == "__main__":
    sys.exit(main())
