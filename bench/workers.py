"""`python -m bench.workers`: chat throughput with 1 and 2 worker processes, same load client."""

from __future__ import annotations

import argparse
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.procs import Proc
from bench.run import SERVER_ENV
from bench.scenarios import Target, chat_load, warm_up
from clients.bots.load import raise_fd_limit
from clients.bots.plan import Mode
from clients.loop import run_async


def start_workers(workdir: Path, count: int, secret: str) -> Proc:
    """`python run.py serve --workers COUNT` on its own embedded PostgreSQL, not pinned."""
    data = workdir / "data"
    argv = [sys.executable, "run.py", "serve", "--workers", str(count), "--port", "0"]
    argv += ["--data-dir", str(data), "--log-level", "WARNING"]
    env = {"CHAT_JWT_SECRET": secret, **SERVER_ENV}
    return Proc(f"workers-{count}", argv, workdir, None, env, pgdata=data / "pgdata")


async def measure(proc: Proc, secret: str, clients: int, duration: float, repeats: int,
                  switch_every: int) -> dict[str, float]:  # fmt: skip
    """Median chats/s over `repeats` runs, and how many cores the load client used."""
    target = Target("server", proc, Mode.PROTOCOL, secret)
    await warm_up(target, switch_every)
    rates, client_cores, p99s = [], [], []
    me = psutil.Process()
    for _ in range(repeats):
        cpu_before, wall_before = sum(me.cpu_times()[:2]), time.monotonic()
        report = await chat_load(target, clients, duration, switch_every)
        cpu = sum(me.cpu_times()[:2]) - cpu_before
        client_cores.append(cpu / (time.monotonic() - wall_before))
        rates.append(float(report["totals"]["chats_per_s"]))
        p99s.append(float(report["latency_ms"]["chat"]["p99"]))
        assert report["totals"]["stale_renders"] == 0, report
    return {
        "chats_per_s": statistics.median(rates),
        "p99_ms": statistics.median(p99s),
        "load_client_cores": statistics.median(client_cores),
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--switch-every", type=int, default=4)
    args = parser.parse_args()
    raise_fd_limit(args.clients + 100)
    secret = secrets.token_urlsafe(32)
    workdir = Path(tempfile.mkdtemp(prefix="persona-workers-"))
    results: dict[int, dict[str, float]] = {}
    try:
        for count in (1, 2):
            proc = start_workers(workdir / f"w{count}", count, secret)
            try:
                results[count] = run_async(
                    measure(
                        proc, secret, args.clients, args.duration, args.repeats, args.switch_every
                    )
                )
            finally:
                proc.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{args.clients} clients, closed loop, switch every {args.switch_every} chats, "
          f"medians of {args.repeats} x {args.duration:g} s, nothing pinned")  # fmt: skip
    print("workers  chats/s  p99 ms  load-client cores")
    for count, result in results.items():
        print(f"{count:7d}  {result['chats_per_s']:7.0f}  {result['p99_ms']:6.1f}  "
              f"{result['load_client_cores']:17.2f}")  # fmt: skip
    ratio = results[2]["chats_per_s"] / results[1]["chats_per_s"]
    print(f"2 workers / 1 worker: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
