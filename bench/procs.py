"""The processes under test: start them pinned to their cores, read their memory, stop them."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
_URL = re.compile(rb"listening on (ws://\S+)")


@dataclass(frozen=True, slots=True)
class Cores:
    """Where the servers, this server's PostgreSQL and the load client run (None: no pinning).

    PostgreSQL goes with the server (`postgres_with="server"`), with the load client
    (`"client"`, so that the server process has a core to itself, as the echo server does), or
    anywhere (`"any"`: both cores, where the kernel finds room).
    """

    server: frozenset[int] | None
    client: frozenset[int] | None
    postgres_with: str = "client"

    @classmethod
    def plan(cls, postgres_with: str = "client") -> Cores:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return cls(None, None, postgres_with)
        return cls(frozenset(cpus[:1]), frozenset(cpus[1:2]), postgres_with)

    @property
    def postgres(self) -> frozenset[int] | None:
        if self.postgres_with == "any" and self.server is not None and self.client is not None:
            return self.server | self.client
        return self.client if self.postgres_with == "client" else self.server

    def describe(self) -> str:
        if self.server is None or self.client is None:
            return "not pinned (fewer than two cores)"
        return (
            f"server on CPU {sorted(self.server)}, its PostgreSQL on CPU "
            f"{sorted(self.postgres or ())}, load client on CPU {sorted(self.client)}"
        )


def _child_setup(cpus: frozenset[int] | None) -> Callable[[], None]:
    def setup() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    return setup


class Proc:
    """One server process started by the benchmark; its output goes to files in `workdir`."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        workdir: Path,
        cpus: frozenset[int] | None,
        env: dict[str, str] | None = None,
        pgdata: Path | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.name = name
        self.pgdata = pgdata
        workdir.mkdir(parents=True, exist_ok=True)
        self._out = workdir / f"{name}.out"
        self._err = workdir / f"{name}.err"
        with self._out.open("wb") as out, self._err.open("wb") as err:
            self.popen = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                preexec_fn=_child_setup(cpus),  # the benchmark starts servers from sync code
            )
        self.url = self._wait_for_url()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            found = _URL.search(self._out.read_bytes())
            if found:
                return found.group(1).decode()
            if self.popen.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        tail = self._err.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{self.name} did not start; its stderr ends with:\n{tail}")

    def pin_postgres(self, cpus: frozenset[int] | None) -> None:
        """Move the server's PostgreSQL (the postmaster and its backends; new backends inherit
        the postmaster's affinity) onto `cpus`."""
        if cpus is None or self.pgdata is None:
            return
        for proc in _postgres_processes(self.pgdata):
            try:
                proc.cpu_affinity(sorted(cpus))
            except psutil.Error:
                continue

    def rss_kib(self) -> int:
        """VmRSS of the server process itself (not of its PostgreSQL), in KiB."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        if found is None:
            raise RuntimeError(f"no VmRSS for {self.name}")
        return int(found.group(1))

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU time (user + system) so far of the server process and of its PostgreSQL."""
        own = psutil.Process(self.pid).cpu_times()
        return own.user + own.system, _postgres_cpu_seconds(self.pgdata)

    def all_cpu_seconds(self) -> float:
        """CPU time (user + system) so far of the server process and of all its child processes
        (workers), without PostgreSQL's."""
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0.0
        postgres = {proc.pid for proc in _postgres_processes(self.pgdata)} if self.pgdata else set()
        total = 0.0
        for proc in procs:
            if proc.pid in postgres:
                continue
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
            if proc.pid == root.pid:  # workers that have ended
                total += times.children_user + times.children_system
        return total

    def cpu_wait_seconds(self) -> float:
        """Time the server process's threads spent runnable but waiting for a CPU (the run
        queue, /proc/PID/task/*/schedstat): what other processes on its core took from it."""
        total = 0
        for stat in Path(f"/proc/{self.pid}/task").glob("*/schedstat"):
            try:
                total += int(stat.read_text().split()[1])
            except (OSError, ValueError, IndexError):
                continue
        return total / 1e9

    def stop(self) -> None:
        """SIGTERM (a graceful drain), then SIGKILL; a PostgreSQL left behind is stopped too."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self.pgdata is not None:
            _stop_postgres(self.pgdata)


def _postgres_processes(pgdata: Path) -> list[psutil.Process]:
    """The postmaster and its children (none when it is not running)."""
    try:
        postmaster = psutil.Process(int((pgdata / "postmaster.pid").read_text().split()[0]))
        return [postmaster, *postmaster.children(recursive=True)]
    except (OSError, ValueError, IndexError, psutil.Error):
        return []


def _postgres_cpu_seconds(pgdata: Path | None) -> float:
    """The postmaster's and its backends' CPU time (0.0 without PostgreSQL): the live ones', and
    through the postmaster's `children_*` times those of backends that have ended, so that a
    backend ending between two readings takes nothing away."""
    if pgdata is None:
        return 0.0
    total = 0.0
    for index, proc in enumerate(_postgres_processes(pgdata)):
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
        if index == 0:  # the postmaster: its children that it has reaped
            total += times.children_user + times.children_system
    return total


def _stop_postgres(pgdata: Path) -> None:
    pid_file = pgdata / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().splitlines()[0])
        os.kill(pid, signal.SIGINT)  # fast shutdown
    except (OSError, ValueError, IndexError):
        return
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def start_echo(workdir: Path, cpus: frozenset[int] | None) -> Proc:
    return Proc("echo", [sys.executable, "-m", "bench.echo", "--port", "0"], workdir, cpus)


def start_chat(
    workdir: Path,
    cpus: frozenset[int] | None,
    secret: str,
    env: dict[str, str],
    root: Path = ROOT,
    name: str = "chat",
) -> Proc:
    """`python run.py serve` of the tree at `root` (this one, or a checkout of another commit)
    on the embedded PostgreSQL in `workdir`, template generator."""
    data = workdir / "data"
    argv = [sys.executable, str(root / "run.py"), "serve", "--port", "0", "--data-dir", str(data)]
    argv += ["--log-level", "WARNING", "--generator", "template"]
    full_env = {"CHAT_JWT_SECRET": secret, "CHAT_API_PORT": "0", **env}
    return Proc(name, argv, workdir, cpus, full_env, pgdata=data / "pgdata", cwd=root)


def checkout(rev: str, into: Path) -> Path:
    """The tree of commit `rev` in `into` (git archive: no work tree of this repository is
    touched); its `run.py` imports its own packages, which come first on its path."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "archive", "--format=tar", rev], cwd=ROOT, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def start_peer(workdir: Path, cpus: frozenset[int] | None, secret: str, pgdata: Path) -> Proc:
    """The FastAPI peer (bench/peer_fastapi.py) on the PostgreSQL of `pgdata` (this server's)."""
    argv = [sys.executable, "-m", "bench.peer_fastapi", "--port", "0"]
    argv += ["--database-url", postgres_dsn(pgdata)]
    return Proc("peer", argv, workdir, cpus, {"CHAT_JWT_SECRET": secret})


def postgres_cpu_seconds(pgdata: Path | None) -> float:
    """CPU time so far of the PostgreSQL in `pgdata`: the postmaster and its children."""
    return _postgres_cpu_seconds(pgdata)


def postgres_dsn(pgdata: Path) -> str:
    return f"postgresql://postgres:@/postgres?host={pgdata}"
