"""`python -m bench.overload`: one server process driven past saturation sheds load as overload.

N conversations (1,500 by default) stream replies from bench.streaming's fake OpenAI endpoint
(30 tokens/s, 200 tokens a reply), each sending its next chat as soon as a reply ends: several
times what one process carries, so that its event loop falls behind. A chat refused
`overloaded` is sent again after the `retry_after_ms` it names, times 1 to 2 (jitter).
Reports the completed replies per second, the chats refused `overloaded`, the chats that failed
otherwise (`unavailable` while the database is up would be the lie this guards against: it
must be 0), the replies in flight that completed, the chat and delta-delay p99, and what the
server's /metrics said (sampled every half second) and logged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.lean import Conn, Tally, close_all, connect, percentile_ms, raise_fd_limit
from bench.procs import ROOT, Cores, Proc
from bench.streaming import TOKENS_PER_S, fake_endpoint, start_server
from bench.tokens import signer
from clients.loop import run_async

METRICS_EVERY_S = 0.5
DRAIN_S = 15.0  # how long the replies in flight at the end are waited for


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__)
    parser.add_argument("--streams", type=int, default=1500, help="conversations (N)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--duration", type=float, default=25.0, help="measured seconds")
    parser.add_argument(
        "--overload-lag-ms", type=float, help="the server's CHAT_OVERLOAD_LAG_MS (0: never sheds)"
    )
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


class Shedding:
    """What the client saw of the shedding: chats refused before any delta, and chats that
    failed `overloaded` after their reply had begun (a commit that timed out)."""

    def __init__(self) -> None:
        self.refused = 0
        self.failed_in_flight = 0

    def watch(self, conn: Conn) -> None:
        """Route `conn`'s frames through `on_text`, after `Conn.start` has set its own."""
        chat_frame = conn.on_text
        loop = asyncio.get_running_loop()

        def on_text(payload: bytes) -> None:
            if conn.tally is None or b'"overloaded"' not in payload:
                chat_frame(payload)
                return
            frame = orjson.loads(payload)
            if frame.get("type") != "error" or frame.get("ref") != conn.chat_id:
                chat_frame(payload)
                return
            began = conn.last_delta != conn.sent_at  # a delta came: it was in flight
            if began:
                self.failed_in_flight += 1
            else:
                self.refused += 1
            conn.chat_id = ""
            delay_s = int((frame.get("details") or {}).get("retry_after_ms", 1000)) / 1000
            # with jitter: clients refused together would otherwise all come back together
            loop.call_later(delay_s * random.uniform(1.0, 2.0), self._retry, conn)

        conn.on_text = on_text

    def _retry(self, conn: Conn) -> None:
        if conn.tally is not None:
            conn._send_next()


class Scrapes:
    """The server's /metrics, read every half second while the load runs."""

    def __init__(self, url: str) -> None:
        host = url.removeprefix("ws://").split("/", 1)[0]
        self.url = f"http://{host}/metrics"
        self.samples = 0
        self.shedding = 0
        self.max_lag_s = 0.0
        self.last: dict[str, float] = {}

    async def run(self, until: float) -> None:
        async with httpx.AsyncClient(timeout=10.0) as http:
            while time.perf_counter() < until:
                await self.scrape(http)
                await asyncio.sleep(METRICS_EVERY_S)
            await self.scrape(http)

    async def scrape(self, http: httpx.AsyncClient) -> None:
        try:
            text = (await http.get(self.url)).text
        except httpx.HTTPError:
            return
        values = {}
        for line in text.splitlines():
            if line.startswith("chat_"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        self.samples += 1
        self.shedding += values.get("chat_overload_shedding", 0.0) == 1.0
        self.max_lag_s = max(self.max_lag_s, values.get("chat_event_loop_lag_seconds", 0.0))
        self.last = values


async def run(proc: Proc, args: argparse.Namespace, secret: str) -> dict[str, Any]:
    users = [f"overload-{index}" for index in range(args.streams)]
    conns = await connect(proc.url, args.streams, False, signer(secret), users)
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    tally = Tally(measure_from=started + args.warmup, stamped=True)
    tally.deadline = started + args.warmup + args.duration
    shedding = Shedding()

    def begin(conn: Conn) -> None:
        conn.start(tally, 0)
        shedding.watch(conn)

    for conn in conns:  # random phases: streams do not tick in step
        loop.call_later(random.uniform(0, 10 / TOKENS_PER_S), begin, conn)
    scrapes = Scrapes(proc.url)
    scraping = asyncio.create_task(scrapes.run(tally.deadline))
    try:
        await asyncio.sleep(args.warmup)
        replies_before, refused_before = tally.replies, shedding.refused
        await asyncio.sleep(args.duration)
        replies = tally.replies - replies_before
        refused = shedding.refused - refused_before
        # the replies in flight at the deadline are waited for, and count as completed or not
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tally.finished.wait(), DRAIN_S)
        unfinished = tally.running  # still streaming, slowly: not counted either way
    finally:
        await scraping
        for conn in conns:
            conn.tally = None
        close_all(conns)
    not_completed = sum(count for kind, count in tally.errors.items() if kind.startswith("reply "))
    return {
        "streams": args.streams,
        "chats_per_s": round(replies / args.duration, 1),
        "refused_overloaded": refused,
        "refused_overloaded_all": shedding.refused,
        "failed_overloaded_in_flight": shedding.failed_in_flight,
        "other_errors": dict(tally.errors),
        "replies_completed": tally.replies - not_completed,
        "replies": tally.replies,
        "unfinished": unfinished,
        "chat_p99_ms": round(percentile_ms(tally.latencies, 0.99), 1),
        "delay_p99_ms": round(percentile_ms([d for d in tally.delays if d == d], 0.99), 1),
        "stale": tally.stale,
        "shedding_share": round(scrapes.shedding / max(1, scrapes.samples), 2),
        "max_loop_lag_ms": round(1000 * scrapes.max_lag_s, 1),
        "server_refused_total": scrapes.last.get("chat_overload_refused_total", 0.0),
        "server_unavailable_total": scrapes.last.get('chat_errors_total{code="unavailable"}', 0.0),
        "server_overloaded_total": scrapes.last.get('chat_errors_total{code="overloaded"}', 0.0),
    }


def log_lines(err: Path) -> Counter[str]:
    """What the server logged that matters here."""
    found: Counter[str] = Counter()
    for line in err.read_text(errors="replace").splitlines():
        for kind in ("Traceback", " ERROR ", "database unreachable", "overloaded:"):
            if kind in line:
                found[kind.strip()] += 1
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cores = Cores.plan()
    if cores.client is not None:
        os.sched_setaffinity(0, cores.client)
    raise_fd_limit()
    if args.overload_lag_ms is not None:  # the server's environment is this process's
        os.environ["CHAT_OVERLOAD_LAG_MS"] = str(args.overload_lag_ms)
    secret = secrets.token_urlsafe(32)
    server: Proc | None = None
    with fake_endpoint() as (fake_url, _):
        workdir = Path(tempfile.mkdtemp(prefix="persona-overload-"))
        try:
            server = start_server(workdir / "chat", cores, fake_url, ROOT, secret)
            print(f"{cores.describe()}; {args.streams} streams for {args.duration:g} s", flush=True)
            result = run_async(run(server, args, secret))
            server.stop()
            result["server_log"] = dict(log_lines(workdir / "chat" / "chat.err"))
        finally:
            if server is not None:
                server.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    report(result)
    if args.json:
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    lied = result["other_errors"] or result["server_unavailable_total"] or result["stale"]
    return 1 if lied else 0


def report(r: dict[str, Any]) -> None:
    print("""
| streams | chats/s | refused overloaded | failed overloaded in flight | other errors |"""
          """ replies completed | chat p99 ms | delta delay p99 ms | shedding | max loop lag ms |
|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"""
          f"""
| {r['streams']:,} | {r['chats_per_s']:,.1f} | {r['refused_overloaded']:,} |"""
          f""" {r['failed_overloaded_in_flight']:,} | {r['other_errors'] or 0} |"""
          f""" {r['replies_completed']:,} of {r['replies']:,}"""
          f""" ({r['unfinished']:,} unfinished {DRAIN_S:g} s after the end) |"""
          f""" {r['chat_p99_ms']:,.1f} |"""
          f""" {r['delay_p99_ms']:,.1f} | {100 * r['shedding_share']:.0f}% of scrapes |"""
          f""" {r['max_loop_lag_ms']:,.0f} |

server /metrics at the deadline: chat_overload_refused_total {r['server_refused_total']:,.0f}"""
          f""" (refused while shedding), chat_errors_total overloaded"""
          f""" {r['server_overloaded_total']:,.0f} (those, and database calls that timed out"""
          f""" while overloaded),"""
          f""" unavailable {r['server_unavailable_total']:,.0f}; stale renders {r['stale']};"""
          f""" server log: {r['server_log'] or 'nothing of note'}""")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
