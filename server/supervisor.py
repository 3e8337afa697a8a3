"""`serve --workers N`: N worker processes on one port (SO_REUSEPORT), kept alive by this one."""

from __future__ import annotations

import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import IO

from prometheus_client import multiprocess

from server.embedded import Keeper

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)
READY_TIMEOUT_S = 60.0
MAX_READY_LINE = 1024  # bytes a worker may write before its "ready" line ends


@dataclass
class Worker:
    index: int
    process: subprocess.Popen[bytes] | None  # None: its last start failed
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0
    restart_at: float | None = None  # when a dead worker is started again


class WorkerFailed(RuntimeError):
    """A worker exited, or said nothing, before it was ready."""


class Supervisor:
    """Starts the workers, restarts one that dies, and forwards SIGTERM for a graceful drain.

    Nothing here waits without a bound: a worker has `ready_timeout_s` to say it is ready (or it
    is killed and tried again later, and SIGTERM stops the wait at once), a dead worker waits
    for its backoff while the others are looked after, and the embedded database's keeper,
    whose restart can take a while, runs in a thread of its own. Workers start one at a time.
    """

    def __init__(
        self,
        command: Sequence[str],
        env: dict[str, str],
        count: int,
        drain_timeout_s: float,
        metrics_path: str,
        keeper: Keeper | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
    ) -> None:
        self._command = command
        self._env = env
        self._count = count
        self._drain_timeout_s = drain_timeout_s
        self._metrics_path = metrics_path
        self._keeper = keeper
        self._ready_timeout_s = ready_timeout_s
        self._workers: dict[int, Worker] = {}
        self._stopping = False
        self._stopped = threading.Event()  # tells the keeper's thread to end

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers.values() if w.process is not None]

    def run(self, on_ready: Callable[[], None]) -> int:
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        keeping = self._keep_database()
        try:
            try:
                for index in range(self._count):
                    self._workers[index] = Worker(index, self._spawn(index))
            except WorkerFailed:
                code = self._stop_all()  # the ones that did start
                if self._stopping:
                    return code
                raise
            on_ready()
            while not self._stopping:
                self._restart_dead()
                time.sleep(0.2)
            return self._stop_all()
        finally:
            self._stopped.set()
            if keeping is not None:
                keeping.join()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _keep_database(self) -> threading.Thread | None:
        if self._keeper is None:
            return None
        thread = threading.Thread(
            target=self._keeper.keep, args=(self._stopped,), name="database-keeper", daemon=True
        )
        thread.start()
        return thread

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("supervisor got signal %d: draining the workers", signum)
        self._stopping = True

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        """Start a worker and wait until it says "ready"; WorkerFailed when it does not in
        time (it is killed then), or when the supervisor is told to stop meanwhile."""
        process = subprocess.Popen(
            list(self._command), env=self._env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        assert process.stdout is not None
        first_line = self._first_line(process.stdout, time.monotonic() + self._ready_timeout_s)
        if first_line != b"ready":  # the worker says "ready" once serving
            process.kill()
            code = process.wait()
            _closed(process)
            self._forget(process.pid)  # it may have started serving, and kept gauges
            why = "stopping" if self._stopping else f"not ready in time, or exit {code}"
            raise WorkerFailed(f"worker {index} failed to start ({why})")
        log.info("worker %d ready (pid %d)", index, process.pid)
        return process

    def _first_line(self, pipe: IO[bytes], deadline: float) -> bytes | None:
        """The first line on `pipe`, stripped; None at the deadline, at the end of the pipe
        before a whole line, or when the supervisor is told to stop."""
        said = b""
        with selectors.DefaultSelector() as selector:
            selector.register(pipe, selectors.EVENT_READ)
            while not self._stopping and (remaining := deadline - time.monotonic()) > 0:
                if not selector.select(timeout=min(0.2, remaining)):
                    continue
                chunk = os.read(pipe.fileno(), 256)  # what is there: never waits for a newline
                if not chunk:
                    return None
                said += chunk
                if b"\n" in said:
                    return said.partition(b"\n")[0].strip()
                if len(said) > MAX_READY_LINE:
                    return None
        return None

    def _restart_dead(self) -> None:
        """Start again each worker that died, once its backoff has passed."""
        for index, worker in list(self._workers.items()):
            if self._stopping:
                return
            process = worker.process
            if process is not None and (code := process.poll()) is None:
                continue
            now = time.monotonic()
            if worker.restart_at is None:
                if process is not None:
                    _closed(process)
                    self._forget(process.pid)
                delay = RESTART_BACKOFF_S[min(worker.restarts, len(RESTART_BACKOFF_S) - 1)]
                if process is not None and now - worker.started_at > 60:
                    delay = RESTART_BACKOFF_S[0]  # it had been running fine: restart quickly
                worker.restart_at = now + delay
                if process is not None:
                    log.warning("worker %d (pid %d) exited with %s; restarting in %.1f s",
                                index, process.pid, code, delay)  # fmt: skip
                continue
            if now < worker.restart_at:
                continue
            restarts = worker.restarts + 1
            try:
                self._workers[index] = Worker(index, self._spawn(index), restarts=restarts)
            except WorkerFailed as exc:
                if not self._stopping:
                    log.error("worker %d could not be restarted: %s", index, exc)
                self._workers[index] = Worker(index, None, restarts=restarts)

    def _forget(self, pid: int) -> None:
        """Drop a dead worker's live gauges from the multiprocess metrics."""
        multiprocess.mark_process_dead(pid, self._metrics_path)  # type: ignore[no-untyped-call]

    def _stop_all(self) -> int:
        running = [(w.index, w.process) for w in self._workers.values() if w.process is not None]
        for _, process in running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._drain_timeout_s + 5
        worst = 0
        for index, process in running:
            try:
                code = process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not drain in time; killing it", index)
                process.kill()
                code = process.wait()
            _closed(process)
            self._forget(process.pid)
            worst = worst or code
        return worst


def _closed(process: subprocess.Popen[bytes]) -> None:
    """Close the pipe a worker said "ready" on, once it has exited."""
    if process.stdout is not None:
        process.stdout.close()


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
