"""`serve --workers N`: N worker processes on one port (SO_REUSEPORT), kept alive by this one."""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType

from prometheus_client import multiprocess

from server.embedded import Keeper

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)
READY_TIMEOUT_S = 60.0


@dataclass
class Worker:
    index: int
    process: subprocess.Popen[bytes]
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0


class Supervisor:
    """Starts the workers, restarts one that dies, and forwards SIGTERM for a graceful drain."""

    def __init__(
        self,
        command: Sequence[str],
        env: dict[str, str],
        count: int,
        drain_timeout_s: float,
        metrics_path: str,
        keeper: Keeper | None = None,
    ) -> None:
        self._command = command
        self._env = env
        self._count = count
        self._drain_timeout_s = drain_timeout_s
        self._metrics_path = metrics_path
        self._keeper = keeper
        self._workers: dict[int, Worker] = {}
        self._stopping = False

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers.values()]

    def run(self, on_ready: Callable[[], None]) -> int:
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            for index in range(self._count):
                self._workers[index] = self._spawn(index)
            on_ready()
            while not self._stopping:
                if self._keeper is not None:  # a restart blocks for its deadline at most
                    self._keeper.check()
                self._restart_dead()
                time.sleep(0.2)
            return self._stop_all()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("supervisor got signal %d: draining the workers", signum)
        self._stopping = True

    def _spawn(self, index: int, restarts: int = 0) -> Worker:
        process = subprocess.Popen(
            list(self._command), env=self._env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        assert process.stdout is not None
        ready = process.stdout.readline().decode().strip()  # the worker says "ready" once serving
        if ready != "ready":
            process.kill()
            raise RuntimeError(f"worker {index} failed to start (exit {process.wait()})")
        log.info("worker %d ready (pid %d)", index, process.pid)
        return Worker(index, process, restarts=restarts)

    def _restart_dead(self) -> None:
        for index, worker in list(self._workers.items()):
            code = worker.process.poll()
            if code is None or self._stopping:
                continue
            self._forget(worker.process.pid)
            delay = RESTART_BACKOFF_S[min(worker.restarts, len(RESTART_BACKOFF_S) - 1)]
            if time.monotonic() - worker.started_at > 60:
                delay = RESTART_BACKOFF_S[0]  # it had been running fine: restart quickly
            log.warning("worker %d (pid %d) exited with %s; restarting in %.1f s",
                        index, worker.process.pid, code, delay)  # fmt: skip
            time.sleep(delay)
            try:
                self._workers[index] = self._spawn(index, worker.restarts + 1)
            except RuntimeError:
                log.exception("worker %d could not be restarted", index)

    def _forget(self, pid: int) -> None:
        """Drop a dead worker's live gauges from the multiprocess metrics."""
        multiprocess.mark_process_dead(pid, self._metrics_path)  # type: ignore[no-untyped-call]

    def _stop_all(self) -> int:
        for worker in self._workers.values():
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._drain_timeout_s + 5
        worst = 0
        for worker in self._workers.values():
            try:
                code = worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not drain in time; killing it", worker.index)
                worker.process.kill()
                code = worker.process.wait()
            self._forget(worker.process.pid)
            worst = worst or code
        return worst


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound (not listening) SO_REUSEPORT socket that holds the port for the workers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def metrics_dir() -> str:
    """A fresh directory for prometheus-client's multiprocess mode."""
    return tempfile.mkdtemp(prefix="persona-chat-metrics-")


def remove_metrics_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
