"""`python -m bench.idle`: RSS per idle authenticated session, against a bare echo connection's.

One fresh server process (this server, then a bare websockets echo server) is pinned to CPU 0.
The load client is spread over several processes on CPU 1, each connecting from loopback source
addresses of its own (127.0.0.2 and up). They open connections in steps (1,000, 5,000, 10,000,
19,000 by default); on this server each one says hello (a signed token, a user of its own) and
creates its avatar. At each step, after a pause, the server's VmRSS is read; the KiB per session
is the slope of a least-squares line through the steps. Then every connection pings once and
must get its answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.lean import Conn, close_all, connect, raise_fd_limit
from bench.procs import ROOT, Cores, Proc, checkout, start_chat, start_echo
from bench.run import SERVER_ENV
from bench.tokens import signer
from clients.loop import run_async

STEP_TIMEOUT_S = 300.0
PING_TIMEOUT_S = 60.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__)
    parser.add_argument("--sessions", type=int, default=19_000, help="the last step (19,000)")
    parser.add_argument(
        "--steps", default="1000,5000,10000", help="steps below --sessions, comma-separated"
    )
    parser.add_argument("--workers", type=int, default=4, help="load client processes (4)")
    parser.add_argument("--hold", type=float, default=5.0, help="seconds held after the last")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before each reading")
    parser.add_argument("--server-rev", metavar="REV", help="this server from commit REV")
    parser.add_argument("--skip-echo", action="store_true")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------- the load client processes


def worker_main(
    pipe: Connection, url: str, echo: bool, secret: str, index: int, hosts: list[str]
) -> None:
    """One load client process: it holds as many connections as the parent asks for."""
    raise_fd_limit()
    run_async(_worker(pipe, url, echo, secret, index, hosts))


async def _worker(
    pipe: Connection, url: str, echo: bool, secret: str, index: int, hosts: list[str]
) -> None:
    conns: list[Conn] = []
    errors: Counter[str] = Counter()
    sign = None if echo else signer(secret)
    while True:
        command, value = await asyncio.to_thread(pipe.recv)
        if command == "grow":
            wanted = int(value) - len(conns)
            users = [f"idle{index}-{len(conns) + n}" for n in range(max(0, wanted))]
            if wanted > 0:
                conns += await connect(url, wanted, echo, sign, users, hosts, errors=errors)
            pipe.send(("held", len(conns), dict(errors)))
        elif command == "ping":
            pipe.send(("pongs", await _ping_all(conns), dict(errors)))
        else:
            close_all(conns)
            await asyncio.sleep(0.5)
            pipe.send(("stopped", len(conns), dict(errors)))
            return


async def _ping_all(conns: Sequence[Conn]) -> int:
    gate = asyncio.Semaphore(200)

    async def one(conn: Conn) -> bool:
        async with gate:
            try:
                frame = await conn.request({"type": "ping", "id": "p"})
            except (ConnectionError, TimeoutError, AssertionError):
                return False
            return frame.get("type") in ("pong", "ping")  # the echo server echoes the ping

    async with asyncio.timeout(PING_TIMEOUT_S):
        return sum(await asyncio.gather(*(one(conn) for conn in conns)))


class Crew:
    """The load client processes, pinned to the client's core."""

    def __init__(self, count: int, url: str, echo: bool, secret: str, cpus: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs = []
        for index in range(count):
            hosts = [f"127.0.0.{2 + index * 4 + n}" for n in range(4)]
            mine, theirs = context.Pipe()
            proc = context.Process(
                target=worker_main, args=(theirs, url, echo, secret, index, hosts), daemon=True
            )
            proc.start()
            if cpus is not None and proc.pid is not None:
                os.sched_setaffinity(proc.pid, cpus)
            self.pipes.append(mine)
            self.procs.append(proc)

    def ask(self, command: str, values: Sequence[int]) -> tuple[int, Counter[str]]:
        for pipe, value in zip(self.pipes, values, strict=True):
            pipe.send((command, value))
        total, errors = 0, Counter[str]()
        for pipe in self.pipes:
            if not pipe.poll(STEP_TIMEOUT_S):
                raise TimeoutError(f"a load client process did not answer {command!r}")
            _, count, errs = pipe.recv()
            total += count
            errors.update(errs)
        return total, errors

    def stop(self) -> None:
        with contextlib.suppress(TimeoutError, OSError, EOFError):
            self.ask("stop", [0] * len(self.pipes))
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


def _share(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if n < total % parts else 0) for n in range(parts)]


def slope(points: Sequence[tuple[int, int]]) -> float:
    """Least-squares KiB per connection through (connections, RSS KiB)."""
    n = len(points)
    if n < 2:
        return float("nan")
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    num = sum((x - mean_x) * (y - mean_y) for x, y in points)
    den = sum((x - mean_x) ** 2 for x, _ in points)
    return num / den if den else float("nan")


def measure(
    name: str, proc: Proc, steps: Sequence[int], args: argparse.Namespace, secret: str, cores: Cores
) -> dict[str, Any]:
    echo = name == "echo"
    crew = Crew(args.workers, proc.url, echo, secret, cores.client)
    try:
        crew.ask("grow", [5] * args.workers)  # first-call costs, then the baseline
        time.sleep(args.settle)
        before = proc.rss_kib()
        points: list[tuple[int, int]] = []
        held, errors = 0, Counter[str]()
        for step in steps:
            started = time.monotonic()
            held, errors = crew.ask("grow", _share(step, args.workers))
            took = time.monotonic() - started
            time.sleep(args.settle)
            rss = proc.rss_kib()
            points.append((held, rss))
            print(
                f"  {name:>6}: {held:>6,} held ({took:4.1f} s to open), RSS {rss / 1024:7.1f} MiB,"
                f" {(rss - before) / max(1, held):5.2f} KiB each since the start;"
                f" errors {dict(errors) or 0}",
                flush=True,
            )
        time.sleep(args.hold)
        pongs, errors = crew.ask("ping", [0] * args.workers)
    finally:
        crew.stop()
    return {
        "server": name,
        "before_kib": before,
        "points": points,
        "kib_per_connection": round(slope(points), 2),
        "pongs": pongs,
        "held": held,
        "errors": dict(errors),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    steps = sorted({*(int(s) for s in args.steps.split(",") if s.strip()), args.sessions})
    steps = [step for step in steps if step <= args.sessions]
    cores = Cores.plan()
    limit = raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="persona-idle-"))
    secret = secrets.token_urlsafe(32)
    print(f"{cores.describe()}; {args.workers} load client processes; file limit {limit};"
          f" steps {steps}", flush=True)  # fmt: skip
    results = []
    try:
        root = ROOT if args.server_rev is None else checkout(args.server_rev, workdir / "tree")
        for name in ("server",) if args.skip_echo else ("echo", "server"):
            if name == "echo":
                proc = start_echo(workdir / "echo", cores.server)
            else:
                proc = start_chat(workdir / "chat", cores.server, secret, SERVER_ENV, root)
                proc.pin_postgres(cores.client)
            try:
                results.append(measure(name, proc, steps, args, secret, cores))
            finally:
                proc.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print("| server | sessions held | answered a ping | RSS per connection (slope) | errors |")
    print("|---|---:|---:|---:|---|")
    for item in results:
        print(f"| {item['server']} | {item['held']:,} | {item['pongs']:,} |"
              f" {item['kib_per_connection']:.2f} KiB | {item['errors'] or 0} |")  # fmt: skip
    ok = all(item["held"] == item["pongs"] == args.sessions for item in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
