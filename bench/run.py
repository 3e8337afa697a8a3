"""`python -m bench`: this server against a bare echo server, side by side, in one run."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from bench import table
from bench.procs import Cores, Proc, checkout, start_chat, start_echo
from bench.profile import Profiler, top_functions
from bench.scenarios import Target, chat_load, database_facts, idle_memory, warm_up
from clients.bots.load import raise_fd_limit
from clients.bots.plan import Mode
from clients.loop import run_async

# Closed-loop bots would trip the default 20 frames/s per connection: the benchmark lifts it.
# Nor may one address hold more than 32 connections that have not said hello (issue 17): the
# load client opens hundreds at once from 127.0.0.1.
SERVER_ENV = {
    "CHAT_RATE_PER_S": "1000000",
    "CHAT_RATE_BURST": "1000000",
    "CHAT_MAX_PREAUTH_PER_IP": "100000",
}
QUICK = {"duration": 2.0, "repeats": 3, "hold": 2.0, "settle": 1.0}
FULL = {"duration": 8.0, "repeats": 5, "hold": 25.0, "settle": 2.0}
QUICK_IDLE, FULL_IDLE = "1000", "1000,5000"

console = Console(width=None if sys.stdout.isatty() else 160, log_path=False)
STARTED = time.monotonic()


def say(text: str) -> None:
    console.print(f"[{time.monotonic() - STARTED:6.1f}s] {text}", highlight=False, markup=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs: about a minute or two")
    parser.add_argument("--duration", type=float, help="seconds per run (quick 2, full 8)")
    parser.add_argument("--repeats", type=int, help="repetitions per load (quick 3, full 5)")
    parser.add_argument("--clients", default="50,500", help="loads, comma-separated")
    parser.add_argument("--idle", help="idle connection counts (quick 1000, full 1000,5000)")
    parser.add_argument("--hold", type=float, help="seconds idle connections are held")
    parser.add_argument("--switch-every", type=int, default=4, help="chats between switches")
    parser.add_argument(
        "--postgres-with",
        choices=("server", "client", "any"),
        default="client",
        help="the core this server's PostgreSQL shares: the server's, the load client's, or any",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also run the server of commit REV, alternating with this one, for a side-by-side"
        " comparison of CPU per chat (e.g. HEAD~3)",
    )
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-idle", action="store_true")
    parser.add_argument("--py-spy", type=Path, help="profile the server at the largest load")
    parser.add_argument("--json", type=Path, help="write every run and the summary as JSON")
    parser.add_argument("--markdown", type=Path, help="write the tables as Markdown")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    return parser


def settings_from(args: argparse.Namespace) -> dict[str, float]:
    chosen = dict(QUICK if args.quick else FULL)
    for key in ("duration", "repeats", "hold"):
        if getattr(args, key) is not None:
            chosen[key] = getattr(args, key)
    return chosen


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def machine() -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }


def run_throughput(
    workdir: Path,
    cores: Cores,
    secret: str,
    loads: Sequence[int],
    chosen: dict[str, float],
    switch_every: int,
    py_spy: Path | None,
    baseline: str | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any], list[tuple[str, float, float]]]:
    """The servers up at once; for each repetition and load, echo, this server, and the
    baseline commit's server when there is one."""
    echo = start_echo(workdir / "echo", cores.server)
    chat = start_chat(workdir / "chat", cores.server, secret, SERVER_ENV)
    chat.pin_postgres(cores.postgres)
    procs = [echo, chat]
    targets = {
        "echo": Target("echo", echo, Mode.ECHO),
        "server": Target("server", chat, Mode.PROTOCOL, secret),
    }
    say(f"echo server at {echo.url}, this server at {chat.url}")
    try:
        if baseline is not None:
            root = checkout(baseline, workdir / "baseline-tree")
            old = start_chat(workdir / "baseline", cores.server, secret, SERVER_ENV, root, "old")
            old.pin_postgres(cores.postgres)
            procs.append(old)
            targets["baseline"] = Target("baseline", old, Mode.PROTOCOL, secret)
            say(f"baseline {baseline} at {old.url}")
        runs = run_async(_throughput(targets, loads, chosen, switch_every, py_spy))
        facts = run_async(database_facts(chat))
    finally:
        for proc in procs:
            proc.stop()
    profile = top_functions(py_spy) if py_spy is not None and py_spy.exists() else []
    return runs, facts, profile


async def _throughput(
    targets: dict[str, Target],
    loads: Sequence[int],
    chosen: dict[str, float],
    switch_every: int,
    py_spy: Path | None,
) -> list[dict[str, Any]]:
    for target in targets.values():
        await warm_up(target, switch_every)
    runs = []
    duration = float(chosen["duration"])
    for rep in range(int(chosen["repeats"])):
        for clients in loads:
            for name in targets:
                gc.collect()
                profiler = None
                if py_spy is not None and name == "server" and rep == 0 and clients == max(loads):
                    profiler = Profiler(targets[name].proc.pid, py_spy, duration)
                report = await chat_load(targets[name], clients, duration, switch_every)
                if profiler is not None:
                    await asyncio.to_thread(profiler.wait)
                runs.append({"rep": rep, "clients": clients, "server": name, "report": report})
                _progress(rep, clients, name, report)
    return runs


def _progress(rep: int, clients: int, name: str, report: dict[str, Any]) -> None:
    totals, chat = report["totals"], report["latency_ms"]["chat"]
    say(
        f"rep {rep + 1} {clients:>4} clients {name:>6}: {totals['chats_per_s']:>8,.0f} chats/s"
        f"  p50 {chat['p50']:6.2f} ms  p99 {chat['p99']:6.2f} ms"
        f"  stale {totals['stale_renders']}  errors {totals['unexpected_errors']}"
    )


def run_idle(
    workdir: Path, cores: Cores, secret: str, counts: Sequence[int], chosen: dict[str, float]
) -> list[dict[str, Any]]:
    """A fresh process per count, so that memory freed by earlier connections hides nothing."""
    results = []
    for count in counts:
        for name in ("echo", "server"):
            proc: Proc = (
                start_echo(workdir / f"idle-echo-{count}", cores.server)
                if name == "echo"
                else start_chat(workdir / f"idle-chat-{count}", cores.server, secret, SERVER_ENV)
            )
            say(f"idle {count:>5} {name:>6}: started")
            try:
                target = Target(name, proc, Mode.ECHO if name == "echo" else Mode.PROTOCOL, secret)
                item = run_async(idle_memory(target, count, chosen["hold"], chosen["settle"]))
            finally:
                proc.stop()
            results.append(item)
            say(
                f"idle {count:>5} {name:>6}: {item['kib_per_connection']:6.1f} KiB/connection,"
                f" {item['pongs']}/{count} answered after {chosen['hold']:.0f} s,"
                f" errors {item['errors'] or 0}"
            )
    return results


def show(rows: list[dict[str, Any]], idle: list[dict[str, Any]], found: list[Any]) -> None:
    for title, data, columns in (
        ("chat throughput and latency (medians over repetitions)", rows, table.THROUGHPUT_COLUMNS),
        ("RSS per idle connection", idle, table.IDLE_COLUMNS),
        (
            "this server against the baseline commit (medians over repetitions)",
            [row for row in rows if "baseline_cpu_us" in row],
            table.BASELINE_COLUMNS,
        ),
    ):
        if not data:
            continue
        out = Table(title=title)
        for name, _ in columns:
            out.add_column(name, justify="right")
        for row in data:
            out.add_row(*table.cells(row, columns))
        console.print(out)
    targets = Table(title="targets (issue 3)")
    for name in ("target", "measured", "met"):
        targets.add_column(name)
    for name, value, ok in found:
        targets.add_row(name, value, "[green]yes[/]" if ok else "[red]NO[/]")
    console.print(targets)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chosen = settings_from(args)
    loads = _ints(args.clients)
    counts = _ints(args.idle or (QUICK_IDLE if args.quick else FULL_IDLE))
    cores = Cores.plan(args.postgres_with)
    if cores.client is not None:
        os.sched_setaffinity(0, cores.client)
    raise_fd_limit(max([*counts, *loads, 0]))
    workdir = Path(tempfile.mkdtemp(prefix="persona-bench-"))
    secret = secrets.token_urlsafe(32)
    say(f"workdir {workdir}; {cores.describe()}; settings {chosen}")
    say(f"this server runs with {SERVER_ENV}: closed-loop bots exceed 20 frames/s")
    runs: list[dict[str, Any]] = []
    facts: dict[str, Any] = {}
    profile: list[tuple[str, float, float]] = []
    idle: list[dict[str, Any]] = []
    try:
        if not args.skip_throughput:
            runs, facts, profile = run_throughput(
                workdir, cores, secret, loads, chosen, args.switch_every, args.py_spy, args.baseline
            )
        if not args.skip_idle:
            idle = run_idle(workdir, cores, secret, counts, chosen)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    rows = table.throughput_rows(runs)
    found = table.targets(rows, idle, facts, runs)
    show(rows, idle, found)
    if facts:
        console.print(f"PostgreSQL: {facts}", highlight=False)
    for name, own, inclusive in profile:
        console.print(f"  {own:5.1f}% self {inclusive:5.1f}% total  {name}", highlight=False)
    summary = {"machine": machine(), "cores": cores.describe(), "settings": chosen,
               "server_env": SERVER_ENV, "throughput": rows, "idle": idle, "database": facts,
               "targets": found, "profile": profile}  # fmt: skip
    if args.json:
        args.json.write_bytes(orjson.dumps({**summary, "runs": runs}, option=orjson.OPT_INDENT_2))
    if args.markdown:
        against = [row for row in rows if "baseline_cpu_us" in row]
        parts = [table.markdown(rows, table.THROUGHPUT_COLUMNS) if rows else "",
                 table.markdown(against, table.BASELINE_COLUMNS) if against else "",
                 table.markdown(idle, table.IDLE_COLUMNS) if idle else "",
                 table.markdown_targets(found)]  # fmt: skip
        args.markdown.write_text("\n\n".join(p for p in parts if p) + "\n")
    correct = all(row["stale_renders"] == 0 for row in rows)
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
