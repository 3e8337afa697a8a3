"""`python -m bench.chaos`: two instances on one PostgreSQL under bots, killed on a schedule.

Instance A (`serve --workers 2`) owns the embedded PostgreSQL; instance B (`--workers 2` too)
shares it through its socket (or both use `--database-url`). Bots chat and switch persona on
both, every user with a connection on each. On a schedule it prints, SIGKILL takes down: the
postmaster (A's keeper starts it again), a worker (its supervisor starts another), a whole
instance, supervisor and workers (started again here), and with `--generator openai` the fake
LLM endpoint (started again here). Then it reports stale renders; errors by kind, each
explained; every acknowledged reply and switch checked in the database; the recovery time
after each fault; and every ERROR line and traceback in the servers' logs. It exits 1 on a
stale render, a lost acknowledged write, an unexplained error kind, a traceback, or a fault
after which no bot got a reply.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import psutil

from bench.chaos_load import (
    Fleet,
    Ledger,
    Recovery,
    missing_writes,
    start_fleet,
)
from bench.procs import Proc, postgres_dsn
from bench.tokens import signer
from clients.bots.bot import Crew
from clients.bots.load import finish_bots, raise_fd_limit
from clients.bots.plan import BotPlan, Phase
from clients.bots.propagation import Propagation
from clients.bots.report import Stats, summarize_ms
from clients.loop import run_async

KINDS = ("postgres", "worker", "instance", "llm")
SERVER_ENV = {
    "CHAT_API_PORT": "0",
    "CHAT_RATE_PER_S": "100000",  # the bots are closed loops: the limit is not under test
    "CHAT_RATE_BURST": "100000",
    "CHAT_DB_TIMEOUT_S": "2",
    "CHAT_DRAIN_TIMEOUT_S": "5",
}
READY_TIMEOUT_S = 60.0  # a fault's process back (a new postmaster, worker or instance)
LLM_DOWN_S = 1.0  # how long the fake LLM endpoint stays dead
RECOVERY_TAIL_S = 5.0  # the load goes on at least this long after the last fault is over

# What each kind of error the bots count means in a chaos run; any other kind fails it.
EXPLAINED: dict[str, str] = {
    "unavailable": "answered `unavailable` while the database was down (its postmaster killed)"
    " or its connections were being made again, or while the LLM endpoint was down",
    "closed_none": "the connection dropped without a close frame: its worker or instance was"
    " killed",
    "closed_1006": "the connection dropped abnormally: its worker or instance was killed",
    "closed_1001": "the server went away (a worker draining)",
    "connect_http_503": "a handshake refused while the instance was starting or draining",
    "connect_http_429": "a handshake refused for now while many bots reconnected at once",
}
EXPLAINED_PREFIXES: dict[str, str] = {
    "connect_": "a reconnect that failed while its instance was down (killed, starting again)",
}
LLM_EXPLAINED: dict[str, str] = {
    "reply_failed": "a reply that failed (stored as failed): the LLM endpoint was killed",
    "reply_interrupted": "a reply cut off: the LLM endpoint was killed under it",
}
# ERROR lines a fault explains, by what they say
EXPLAINED_ERROR_LINES = (
    "is not running; starting it again",
    "could not be restarted",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Instance:
    """One `run.py serve --workers 2` on a fixed port, started again after a kill; its logs
    are `NAME-N.err` in its directory, one per start."""

    def __init__(self, name: str, workdir: Path, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.workdir = workdir
        self.port = free_port()
        self._argv = [*argv, "--port", str(self.port)]
        self._env = env
        self.pgdata: Path | None = None
        self.proc: Proc | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self) -> None:
        self.starts += 1
        self.proc = Proc(
            f"{self.name}-{self.starts}", self._argv, self.workdir, None, self._env, self.pgdata
        )

    def workers(self) -> list[psutil.Process]:
        assert self.proc is not None
        try:
            children = psutil.Process(self.proc.pid).children()
            return [c for c in children if "--worker" in c.cmdline()]
        except psutil.Error:
            return []

    def kill(self) -> None:
        """SIGKILL the supervisor and its workers (not the PostgreSQL it may have started)."""
        assert self.proc is not None
        victims = [psutil.Process(self.proc.pid), *self.workers()]
        for victim in victims:
            victim.send_signal(signal.SIGKILL)
        psutil.wait_procs(victims, timeout=READY_TIMEOUT_S)
        self.proc.popen.wait()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def logs(self) -> list[Path]:
        return sorted(self.workdir.glob(f"{self.name}-*.err"))


class FakeLlm:
    """The fake OpenAI-compatible endpoint of the tests, in a process of its own on a fixed port
    (`python -m bench.chaos fake-llm PORT`), so that it can be killed and started again."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: Proc | None = None
        self.starts = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        self.starts += 1
        argv = [sys.executable, "-m", "bench.chaos", "fake-llm", str(self.port)]
        self.proc = Proc(f"llm-{self.starts}", argv, self.workdir, None)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.popen.send_signal(signal.SIGKILL)
        self.proc.popen.wait()


async def serve_fake_llm(port: int) -> None:
    from tests.server.fake_llm import FakeLLM, Script  # the tests' fake, in a process here

    fake = FakeLLM(Script(tokens=("Well", " hello", " there", ",", " friend", "!")))
    # the fake binds port 0 by itself; a chaos run needs the same port after each restart
    fake._server = await asyncio.start_server(fake._serve, "127.0.0.1", port)
    print(f"listening on ws://127.0.0.1:{port}/v1", flush=True)  # what Proc waits for
    while True:
        await asyncio.sleep(5)
        fake.requests.clear()  # a long run must not keep every request
        fake.connections.clear()


def postmaster_pid(pgdata: Path) -> int | None:
    try:
        return int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


async def until(condition: Any, what: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {timeout_s:.0f} s: {what}")
        await asyncio.sleep(0.05)


class Chaos:
    """The instances, the fake LLM, and the faults."""

    def __init__(self, args: argparse.Namespace, workdir: Path, secret: str) -> None:
        self.args = args
        self.workdir = workdir
        self.llm = FakeLlm(workdir) if args.generator == "openai" else None
        env = {**SERVER_ENV, "CHAT_JWT_SECRET": secret}
        argv = [sys.executable, "run.py", "serve", "--workers", str(args.workers)]
        argv += ["--log-level", "INFO", "--generator", args.generator]
        if self.llm is not None:
            argv += ["--llm-base-url", self.llm.base_url, "--llm-model", "fake-model"]
        data = workdir / "a-data"
        if args.database_url:
            self.dsn = args.database_url
            env_a = env_b = {**env, "DATABASE_URL": args.database_url}
            self.pgdata: Path | None = None
        else:
            self.pgdata = data / "pgdata"
            self.dsn = postgres_dsn(self.pgdata)
            env_a, env_b = env, {**env, "DATABASE_URL": self.dsn}
        self.a = Instance("a", workdir, [*argv, "--data-dir", str(data)], env_a)
        self.a.pgdata = self.pgdata  # stopped with A at the end, if it is left running
        self.b = Instance("b", workdir, [*argv, "--data-dir", str(workdir / "b-data")], env_b)
        self.instances = (self.a, self.b)
        self._turn: Counter[str] = Counter()

    def start(self) -> None:
        if self.llm is not None:
            self.llm.start()
        self.a.start()  # first: B uses A's PostgreSQL
        self.b.start()

    def stop(self) -> None:
        for proc in (self.b, self.a):
            proc.stop()
        if self.llm is not None and self.llm.proc is not None:
            self.llm.proc.stop()

    def kinds(self) -> list[str]:
        kinds = [k for k in KINDS if k != "llm" or self.llm is not None]
        if self.pgdata is None:
            kinds.remove("postgres")  # an external database is not this run's to kill
        return kinds

    async def strike(self, kind: str, recovery: Recovery) -> str:
        """One fault; returns once what was killed runs again."""
        turn = self._turn[kind]
        self._turn[kind] += 1
        if kind == "postgres":
            assert self.pgdata is not None
            pid = postmaster_pid(self.pgdata)
            assert pid is not None, "no postmaster"
            recovery.fault(f"postgres (pid {pid})")
            os.kill(pid, signal.SIGKILL)
            pgdata = self.pgdata
            await until(
                lambda: (
                    postmaster_pid(pgdata) not in (None, pid)
                    and psutil.pid_exists(postmaster_pid(pgdata) or 0)
                ),
                "a new postmaster",
            )
            return f"killed the postmaster (pid {pid}); A's keeper started another"
        if kind == "worker":
            instance = self.instances[turn % 2]
            await until(lambda: bool(instance.workers()), f"the workers of {instance.name}")
            workers = instance.workers()
            victim = workers[turn % len(workers)]
            before = {w.pid for w in workers}
            recovery.fault(f"worker of {instance.name} (pid {victim.pid})")
            victim.send_signal(signal.SIGKILL)
            await until(
                lambda: (
                    len({w.pid for w in instance.workers()} - before) >= 1
                    and len(instance.workers()) >= self.args.workers
                ),
                f"a new worker in {instance.name}",
            )
            return f"killed worker {victim.pid} of {instance.name}; its supervisor started another"
        if kind == "instance":
            instance = self.instances[1 - turn % 2]  # B first: A keeps the database
            assert instance.proc is not None
            pid = instance.proc.pid
            recovery.fault(f"instance {instance.name} (supervisor {pid})")
            await asyncio.to_thread(instance.kill)
            await asyncio.to_thread(instance.start)
            return f"killed instance {instance.name} (supervisor {pid} and workers); started again"
        assert self.llm is not None and self.llm.proc is not None
        pid = self.llm.proc.pid
        recovery.fault(f"llm (pid {pid})")
        self.llm.kill()
        await asyncio.sleep(LLM_DOWN_S)
        await asyncio.to_thread(self.llm.start)
        return f"killed the fake LLM endpoint (pid {pid}); started again after {LLM_DOWN_S:g} s"

    def logs(self) -> list[Path]:
        return [*self.a.logs(), *self.b.logs()]


def schedule(kinds: list[str], kills: int, duration_s: float) -> list[tuple[float, str]]:
    """`kills` faults of each kind, interleaved, evenly over the run (none in its first and
    last stretch, so that the recovery from the last one is seen)."""
    events = [kind for _ in range(kills) for kind in kinds]
    step = duration_s / (len(events) + 1)
    return [(step * (i + 1), kind) for i, kind in enumerate(events)]


async def run_faults(
    chaos: Chaos, plan: list[tuple[float, str]], recovery: Recovery, started: float
) -> list[dict[str, Any]]:
    done = []
    for at, kind in plan:
        await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
        t = time.perf_counter() - started
        print(f"[{t:6.1f} s] killing: {kind}", flush=True)
        said = await chaos.strike(kind, recovery)
        back = time.perf_counter() - started
        print(f"[{back:6.1f} s] {said}", flush=True)
        done.append({"kind": kind, "at_s": round(t, 2), "back_at_s": round(back, 2), "what": said})
    return done


NUMBERS = re.compile(r"\b\d+(\.\d+)?\b|0x[0-9a-f]+|/tmp/\S+")
LINE_HEAD = re.compile(r"^\S+ \S+ \[\d+\] (\w+)\s+(.*)$")


def scan_logs(paths: list[Path]) -> dict[str, Any]:
    """Every ERROR line (grouped, numbers and paths masked) and every traceback (grouped by its
    last line) in the servers' logs."""
    errors: Counter[str] = Counter()
    tracebacks: Counter[str] = Counter()
    for path in paths:
        lines = path.read_text(errors="replace").splitlines()
        in_traceback = False
        last = ""
        for line in lines:
            head = LINE_HEAD.match(line)
            if head is not None:
                if in_traceback:
                    tracebacks[NUMBERS.sub("N", last)] += 1
                in_traceback = False
                if head.group(1) in ("ERROR", "CRITICAL"):
                    errors[f"{head.group(1)} {NUMBERS.sub('N', head.group(2))}"] += 1
            elif line.startswith("Traceback"):
                in_traceback = True
            elif in_traceback and line.strip():
                last = line.strip()
        if in_traceback:
            tracebacks[NUMBERS.sub("N", last)] += 1
    return {
        "error_lines": dict(errors.most_common()),
        "unexplained_error_lines": [
            line for line in errors if not any(why in line for why in EXPLAINED_ERROR_LINES)
        ],
        "tracebacks": dict(tracebacks.most_common()),
    }


def explain(errors: dict[str, int], llm: bool) -> tuple[dict[str, str], list[str]]:
    """Each error kind with what explains it, and the kinds nothing explains."""
    table = {**EXPLAINED, **(LLM_EXPLAINED if llm else {})}
    explained: dict[str, str] = {}
    unexplained: list[str] = []
    for kind in errors:
        why = table.get(kind) or next(
            (why for prefix, why in EXPLAINED_PREFIXES.items() if kind.startswith(prefix)), None
        )
        if why is None:
            unexplained.append(kind)
        else:
            explained[kind] = why
    return explained, unexplained


async def chaos_run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    secret = secrets.token_urlsafe(32)
    chaos = Chaos(args, workdir, secret)
    await asyncio.to_thread(chaos.start)
    try:
        return await _load_and_faults(chaos, args, secret)
    finally:
        await asyncio.to_thread(chaos.stop)


async def _load_and_faults(chaos: Chaos, args: argparse.Namespace, secret: str) -> dict[str, Any]:
    plans = [
        BotPlan(
            url=instance.url,
            switch_every=args.switch_every,
            answer_timeout_s=20.0,
            open_timeout_s=10.0,
        )
        for instance in chaos.instances
    ]
    slots = max(args.clients, 2)
    users = max(1, min(args.users or slots // 2, slots // 2))
    stats, phase, ledger, recovery = Stats(), Phase(), Ledger(), Recovery(slots)
    propagation = Propagation(stats)  # a switch on one instance, pushed on the other
    run_id = secrets.token_hex(4)
    fleet = Fleet(plans, slots, users, run_id, signer(secret), Crew(None, propagation, run_id))
    print(f"instances: A {chaos.a.url}, B {chaos.b.url}; {slots} bots, {users} users; logs and "
          f"data in {chaos.workdir}", flush=True)  # fmt: skip
    tasks = await start_fleet(fleet, stats, phase, ledger, recovery)
    plan = schedule(chaos.kinds(), args.kills, args.duration)
    started = time.perf_counter()
    phase.start(args.duration)
    faults = await run_faults(chaos, plan, recovery, started)
    phase.deadline = max(phase.deadline, time.perf_counter() + RECOVERY_TAIL_S)  # see them back
    await finish_bots(tasks, args.duration + 60.0, stats)  # a slot still running: bot_stuck
    propagation.finish()
    elapsed = time.perf_counter() - started
    ledger_check = await missing_writes(chaos.dsn, ledger)
    errors = dict(sorted(stats.errors.items()))
    explained, unexplained = explain(errors, chaos.llm is not None)
    logs = scan_logs(chaos.logs())
    recoveries = recovery.summary()
    unrecovered = [r["fault"] for r in recoveries if r["bots_replied"] == 0]
    failures = []
    if stats.stale:
        failures.append(f"{stats.stale} stale renders")
    if ledger_check["lost_replies"] or ledger_check["lost_switches"]:
        failures.append("acknowledged writes missing from the database")
    if unexplained:
        failures.append(f"unexplained error kinds: {', '.join(unexplained)}")
    if logs["tracebacks"]:
        failures.append(f"{sum(logs['tracebacks'].values())} tracebacks in the servers' logs")
    if unrecovered:
        failures.append(f"no reply after: {', '.join(unrecovered)}")
    return {
        "ok": not failures,
        "failures": failures,
        "config": {
            "duration_s": args.duration,
            "kills_per_kind": args.kills,
            "clients": slots,
            "users": users,
            "workers_per_instance": args.workers,
            "generator": args.generator,
            "database": "external" if args.database_url else "embedded, owned by instance A",
        },
        "totals": {
            "elapsed_s": round(elapsed, 1),
            "replies": stats.replies,
            "replies_per_s": round(stats.replies / max(elapsed, 1e-9), 1),
            "switch_acks": stats.switch_acks,
            "stale_renders": stats.stale,
            "pushes_expected": stats.pushes_expected,
            "pushes_received": len(stats.propagation_s),
        },
        "latency_ms": {
            "chat": summarize_ms(stats.chat_s),
            "propagation": summarize_ms(stats.propagation_s),
        },
        "stale_examples": stats.stale_examples,
        "errors": errors,
        "errors_explained": explained,
        "errors_unexplained": unexplained,
        "faults": faults,
        "recovery": recoveries,
        "ledger": ledger_check,
        "logs": logs,
    }


def print_report(report: dict[str, Any]) -> None:
    totals = report["totals"]
    print(f"\n{totals['replies']:,} replies ({totals['replies_per_s']:,.0f}/s), "
          f"{totals['switch_acks']:,} switches acknowledged, "
          f"{totals['stale_renders']} stale renders")  # fmt: skip
    push = report["latency_ms"]["propagation"]
    print(f"switches pushed to the user's other connections (on both instances): "
          f"{totals['pushes_received']:,} of {totals['pushes_expected']:,} timed, from the "
          f"switcher's answer: p50 {push['p50']} ms, p99 {push['p99']} ms")  # fmt: skip
    for example in report["stale_examples"]:
        print(f"  stale: {example}")
    print("errors by kind:")
    for kind, count in report["errors"].items() or [("(none)", 0)]:
        why = report["errors_explained"].get(kind, "UNEXPLAINED")
        print(f"  {count:8,}  {kind}: {why}")
    ledger = report["ledger"]
    print(
        f"ledger: {ledger['replies_checked']:,} acknowledged replies and "
        f"{ledger['switches_acked']:,} switches ({ledger['users_checked']} users) checked: "
        f"{ledger['lost_replies']} replies and {ledger['lost_switches']} personas missing"
    )
    for example in ledger["lost_reply_examples"] + ledger["lost_switch_examples"]:
        print(f"  missing: {example}")
    print("recovery (first completed reply after the kill, over the bots):")
    for row in report["recovery"]:
        print(f"  {row['fault']}: p50 {row['p50_s']} s, max {row['max_s']} s"
              f" ({row['bots_without_reply']} bots without a reply after it)")  # fmt: skip
    logs = report["logs"]
    print("ERROR lines in the servers' logs:")
    for line, count in logs["error_lines"].items() or [("(none)", 0)]:
        print(f"  {count:5}  {line}")
    print("tracebacks in the servers' logs:")
    for line, count in logs["tracebacks"].items() or [("(none)", 0)]:
        print(f"  {count:5}  {line}")
    print("verdict:", "OK" if report["ok"] else "FAILED: " + "; ".join(report["failures"]))


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (600)")
    parser.add_argument("--kills", type=int, default=3, help="kills of each kind (3)")
    parser.add_argument("--clients", type=int, default=100, help="bots, over both instances")
    parser.add_argument("--users", type=int, default=None, help="distinct users (clients / 2)")
    parser.add_argument("--workers", type=int, default=2, help="workers per instance (2)")
    parser.add_argument("--switch-every", type=int, default=4, help="chats between switches")
    parser.add_argument("--generator", choices=("template", "openai"), default="template",
                        help="openai: replies from a fake LLM endpoint, killed too")  # fmt: skip
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL") or None,
        help="one PostgreSQL for both (default: $DATABASE_URL, else A's embedded one)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="kept: logs and data")
    parser.add_argument("--json", type=Path, default=None, help="write the report here too")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fake-llm"]:
        run_async(serve_fake_llm(int(argv[1])))
        return 0
    args = parser().parse_args(argv)
    for name in [n for n in os.environ if n.startswith("CHAT_") or n == "DATABASE_URL"]:
        del os.environ[name]  # the servers get the settings chosen here, and only those
    raise_fd_limit(args.clients + 200)
    keep = args.workdir is not None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="persona-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = run_async(chaos_run(args, workdir.resolve()))
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print_report(report)
    if args.json is not None:
        args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
