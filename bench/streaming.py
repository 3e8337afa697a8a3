"""`python -m bench.streaming`: how many streamed conversations one server process carries.

N conversations each stream a reply from a fake OpenAI-compatible endpoint that sends 30
tokens/s, 200 tokens per reply; a conversation sends its next chat as soon as a reply ends. The
fake runs in a process of its own next to the load client (CPU 1), this server (one process,
`--generator openai`) on CPU 0. Each token carries the moment the fake wrote it, so the client
measures the delay from the fake's write to its read of the `reply_delta` (what the server adds,
plus two loopback hops), besides the gaps between deltas (33 ms sent). CPU per `reply_delta`
frame is the server's CPU time over the measured window divided by the deltas received, against
the echo server's CPU per message under the lean client's closed loop (50 connections).

N goes up the given list until the delay's p99 exceeds the limit (25 ms) or a stream falls
below 95% of the rate sent; the report names the largest N that stayed within.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import random
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

import orjson
import psutil

from bench.lean import Tally, close_all, closed_loop, connect, percentile_ms, raise_fd_limit
from bench.procs import ROOT, Cores, Proc, checkout, start_echo
from bench.profile import Profiler, by_area, top_functions
from bench.run import SERVER_ENV
from bench.tokens import signer
from clients.loop import run_async

TOKENS_PER_S = 30.0
TOKENS_PER_REPLY = 200
DELAY_P99_LIMIT_MS = 25.0
MIN_RATE_SHARE = 0.95
HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.streaming", description=__doc__)
    parser.add_argument("--streams", default="100,200,500,1000,2000", help="the Ns, ascending")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per N")
    parser.add_argument("--echo-duration", type=float, default=3.0, help="the echo run (s)")
    parser.add_argument("--budget", type=float, default=600.0, help="no new N after this (s)")
    parser.add_argument("--server-rev", metavar="REV", help="this server from commit REV")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--all", action="store_true", help="run every N, also after one that was not within"
    )
    parser.add_argument("--py-spy", type=Path, help="profile the server at the first N")
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------- the fake endpoint


def _event(content: str | None, finish: str | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    chunk = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
             "model": "fake", "choices": [choice]}  # fmt: skip
    data = b"data: " + orjson.dumps(chunk) + b"\n\n"
    return b"%x\r\n%b\r\n" % (len(data), data)


class FakeStream(asyncio.Protocol):
    """One connection of the server's HTTP client; requests one after the other (keep-alive)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.timer: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head, sep, rest = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(rest) < length:
            return
        self.buffer = rest[length:]
        assert self.transport is not None
        self.transport.write(HEAD + _event(""))
        self.tick(0, self.loop.time())

    def tick(self, sent: int, started: float) -> None:
        transport = self.transport
        if transport is None:
            return
        if sent == TOKENS_PER_REPLY:
            transport.write(_event(None, "stop") + _event_done())
            self.timer = None
            return
        transport.write(_event(f" t{time.perf_counter():.6f} word{sent}"))
        due = started + (sent + 1) / TOKENS_PER_S
        self.timer = self.loop.call_at(due, self.tick, sent + 1, started)


def _event_done() -> bytes:
    data = b"data: [DONE]\n\n"
    return b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data)


def fake_main(pipe: Connection) -> None:
    run_async(_fake(pipe))


@contextlib.contextmanager
def fake_endpoint() -> Iterator[tuple[str, int]]:
    """The fake endpoint in a process of its own (spawned): its base URL and pid, until the
    block ends."""
    context = multiprocessing.get_context("spawn")
    mine, theirs = context.Pipe()
    fake = context.Process(target=fake_main, args=(theirs,), daemon=True)
    fake.start()
    try:
        yield f"http://127.0.0.1:{mine.recv()}/v1", fake.pid or 0
    finally:
        mine.send("stop")
        fake.join(5)
        if fake.is_alive():
            fake.kill()


async def _fake(pipe: Connection) -> None:
    server = await asyncio.get_running_loop().create_server(
        FakeStream, "127.0.0.1", 0, backlog=4096
    )
    pipe.send(server.sockets[0].getsockname()[1])
    await asyncio.to_thread(pipe.recv)  # any message: stop
    server.close()


# ---------------------------------------------------------------------- the measurement


def start_server(workdir: Path, cores: Cores, fake_url: str, root: Path, secret: str) -> Proc:
    data = workdir / "data"
    argv = [sys.executable, str(root / "run.py"), "serve", "--port", "0", "--data-dir", str(data)]
    argv += ["--log-level", "WARNING", "--generator", "openai", "--llm-base-url", fake_url]
    argv += ["--llm-model", "fake"]
    env = {"CHAT_JWT_SECRET": secret, "CHAT_API_PORT": "0", **SERVER_ENV}
    proc = Proc("chat", argv, workdir, cores.server, env, pgdata=data / "pgdata", cwd=root)
    proc.pin_postgres(cores.client)
    return proc


async def one_n(
    proc: Proc, streams: int, args: argparse.Namespace, secret: str, fake_pid: int
) -> dict[str, Any]:
    users = [f"stream-{index}" for index in range(streams)]
    conns = await connect(proc.url, streams, False, signer(secret), users)
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    tally = Tally(measure_from=started + args.warmup, stamped=True)
    tally.deadline = started + args.warmup + args.duration
    for conn in conns:  # random phases: streams do not tick in step
        loop.call_later(random.uniform(0, 1.0 / TOKENS_PER_S * 10), conn.start, tally, 0)
    try:
        await asyncio.sleep(args.warmup)
        profiler = None
        if args.py_spy is not None and not args.py_spy.exists():
            profiler = Profiler(proc.pid, args.py_spy, args.duration, args.native)
        cpu_before, deltas_before = proc.all_cpu_seconds(), tally.deltas
        wait_before = proc.cpu_wait_seconds()
        client_before, fake_before = time.process_time(), _cpu_seconds(fake_pid)
        replies_before = tally.replies
        await asyncio.sleep(args.duration)
        cpu = proc.all_cpu_seconds() - cpu_before
        waited = proc.cpu_wait_seconds() - wait_before
        client = time.process_time() - client_before
        fake = _cpu_seconds(fake_pid) - fake_before
        deltas = tally.deltas - deltas_before
        replies = tally.replies - replies_before
        gaps, delays = list(tally.gaps), [d for d in tally.delays if d == d]
        errors = dict(tally.errors)
        if profiler is not None:
            await asyncio.to_thread(profiler.wait)
    finally:
        for conn in conns:
            conn.tally = None  # the replies cut short below are not errors
        close_all(conns)
    await asyncio.sleep(1.0)
    rate = deltas / max(1, streams) / args.duration
    result = {
        "streams": streams,
        "deltas": deltas,
        "replies": replies,
        "deltas_per_s_per_stream": round(rate, 2),
        "gap_p50_ms": round(percentile_ms(gaps, 0.50), 2),
        "gap_p99_ms": round(percentile_ms(gaps, 0.99), 2),
        "delay_p50_ms": round(percentile_ms(delays, 0.50), 2),
        "delay_p99_ms": round(percentile_ms(delays, 0.99), 2),
        "server_cpu_share": round(cpu / args.duration, 3),
        "server_waited": round(waited / args.duration, 3),
        "client_busy": round(client / args.duration, 3),
        "fake_busy": round(fake / args.duration, 3),
        "server_cpu_us_per_delta": round(cpu / max(1, deltas) * 1e6, 1),
        "errors": errors,
    }
    result["within"] = (
        result["delay_p99_ms"] <= DELAY_P99_LIMIT_MS
        and rate >= MIN_RATE_SHARE * TOKENS_PER_S
        and not errors
    )
    return result


def _cpu_seconds(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


async def echo_per_message(proc: Proc, duration_s: float) -> float:
    conns = await connect(proc.url, 50, True, None, ["echo"])
    counters: dict[str, float] = {}
    tally, _ = await closed_loop(
        conns,
        duration_s,
        0,
        lambda: counters.__setitem__("before", proc.all_cpu_seconds()),
        lambda: counters.__setitem__("after", proc.all_cpu_seconds()),
    )
    close_all(conns)
    return (counters["after"] - counters["before"]) / max(1, tally.replies) * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ns = [int(part) for part in args.streams.split(",") if part.strip()]
    cores = Cores.plan()
    if cores.client is not None:
        os.sched_setaffinity(0, cores.client)
    raise_fd_limit()
    secret = secrets.token_urlsafe(32)
    procs: list[Proc] = []
    results: list[dict[str, Any]] = []
    echo_us = 0.0
    began = time.monotonic()
    with fake_endpoint() as (fake_url, fake_pid):
        workdir = Path(tempfile.mkdtemp(prefix="persona-streaming-"))
        try:
            root = ROOT if args.server_rev is None else checkout(args.server_rev, workdir / "tree")
            echo = start_echo(workdir / "echo", cores.server)
            procs.append(echo)
            echo_us = run_async(echo_per_message(echo, args.echo_duration))
            echo.stop()
            print(f"{cores.describe()}; the fake at {fake_url} (CPU 1); echo server: {echo_us:.1f}"
                  " µs of CPU per message (50 connections, closed loop)", flush=True)  # fmt: skip
            server = start_server(workdir / "chat", cores, fake_url, root, secret)
            procs.append(server)
            for streams in ns:
                if time.monotonic() - began > args.budget:
                    print(f"budget of {args.budget:.0f} s spent: N = {streams} not run", flush=True)
                    break
                result = run_async(one_n(server, streams, args, secret, fake_pid))
                result["vs_echo"] = round(result["server_cpu_us_per_delta"] / max(echo_us, 1e-9), 2)
                results.append(result)
                print(
                    f"N {streams:>5}: {result['deltas_per_s_per_stream']:5.1f} deltas/s per stream,"
                    f" gap p50/p99 {result['gap_p50_ms']:.1f}/{result['gap_p99_ms']:.1f} ms,"
                    f" delay p50/p99 {result['delay_p50_ms']:.1f}/{result['delay_p99_ms']:.1f} ms,"
                    f" server {100 * result['server_cpu_share']:.0f}% of a core"
                    f" (waited for it {100 * result['server_waited']:.0f}%), load client"
                    f" {100 * result['client_busy']:.0f}%, fake {100 * result['fake_busy']:.0f}%,"
                    f" {result['server_cpu_us_per_delta']:.1f} µs per delta"
                    f" ({result['vs_echo']:.2f}x echo), errors {result['errors'] or 0}",
                    flush=True,
                )
                if not result["within"] and not args.all:
                    break
        finally:
            for proc in procs:
                proc.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    report(results, echo_us)
    if args.py_spy is not None and args.py_spy.exists():
        print(f"\npy-spy at N = {ns[0]}, share of samples by area:")
        for area, share in by_area(args.py_spy):
            print(f"  {share:5.1f}%  {area}")
        for name, own, inclusive in top_functions(args.py_spy, 25):
            print(f"  {own:5.1f}% self {inclusive:5.1f}% total  {name}")
    if args.json:
        args.json.write_bytes(orjson.dumps({"echo_us_per_message": echo_us, "runs": results}))
    return 0


def report(results: list[dict[str, Any]], echo_us: float) -> None:
    print()
    print("| N | deltas/s per stream | gap p50 / p99 ms | delay p50 / p99 ms | server CPU |"
          " waited for CPU | µs per delta | / echo's per message | errors |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        print(f"| {r['streams']:,} | {r['deltas_per_s_per_stream']:.1f} |"
              f" {r['gap_p50_ms']:.1f} / {r['gap_p99_ms']:.1f} |"
              f" {r['delay_p50_ms']:.1f} / {r['delay_p99_ms']:.1f} |"
              f" {100 * r['server_cpu_share']:.0f}% | {100 * r['server_waited']:.0f}% |"
              f" {r['server_cpu_us_per_delta']:.1f} |"
              f" {r['vs_echo']:.2f}x | {r['errors'] or 0} |")  # fmt: skip
    within = [r["streams"] for r in results if r["within"]]
    best = max(within) if within else None
    print(f"\nlargest N within delay p99 <= {DELAY_P99_LIMIT_MS:g} ms and >= "
          f"{MIN_RATE_SHARE * TOKENS_PER_S:g} deltas/s: {best if best else 'none'}"
          f" (echo server: {echo_us:.1f} µs per message)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
