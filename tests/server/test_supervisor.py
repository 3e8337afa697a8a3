"""The supervisor of `serve --workers N` with real worker processes: no wait without a bound."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from server.supervisor import Supervisor, WorkerFailed

# A stand-in for `run.py serve --worker`: the n-th start does what MODES[n] says (the last one
# repeats). Like a worker, it keeps a live gauge in the multiprocess metrics directory.
WORKER = """
import os, pathlib, signal, sys, time
from prometheus_client import Gauge
starts = pathlib.Path(os.environ["STARTS"])
before = starts.read_text() if starts.exists() else ""
n = len(before.split())
starts.write_text(before + f"{os.getpid()}\\n")
modes = os.environ["MODES"].split(",")
mode = modes[min(n, len(modes) - 1)]
Gauge("worker_up", "a live gauge", multiprocess_mode="livesum").set(1)
if mode == "hang":
    time.sleep(600)
if mode == "partial":  # half a line, then nothing
    sys.stdout.write("rea")
    sys.stdout.flush()
    time.sleep(600)
if mode == "exit":
    sys.exit(3)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


class Stopped(Exception):
    """The supervisor returned before the background steps were done."""


@pytest.fixture(autouse=True)
def harmless_sigterm() -> Iterator[None]:
    """Outside `Supervisor.run` (which installs its own handler), a SIGTERM does nothing."""
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    yield
    signal.signal(signal.SIGTERM, previous)


def _supervisor(
    tmp_path: Path, modes: str, ready_timeout_s: float
) -> tuple[Supervisor, Path, Path]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    starts = tmp_path / "starts"
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    env = {**os.environ, "STARTS": str(starts), "MODES": modes}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
    supervisor = Supervisor(
        [sys.executable, str(script)], env, 1, 2.0, str(metrics), ready_timeout_s=ready_timeout_s
    )
    return supervisor, starts, metrics


def _started(starts: Path) -> list[int]:
    return [int(pid) for pid in starts.read_text().split()] if starts.exists() else []


def _supervise(supervisor: Supervisor, steps: Callable[[threading.Event], None]) -> int:
    """`supervisor.run` here, `steps` in a thread, then SIGTERM (the supervisor's signal)."""
    done = threading.Event()
    failures: list[BaseException] = []

    def background() -> None:
        try:
            steps(done)
        except BaseException as exc:
            failures.append(exc)
        if not done.is_set():
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=background, daemon=True)
    thread.start()
    try:
        code = supervisor.run(lambda: None)
    finally:
        done.set()
        thread.join(20)
    if failures and not isinstance(failures[0], Stopped):
        raise failures[0]
    return code


def _until(condition: Callable[[], bool], timeout_s: float, done: threading.Event) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if done.is_set():
            raise Stopped()
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def _gauge_files(metrics: Path, pid: int) -> list[Path]:
    return list(metrics.glob(f"gauge_live*_{pid}.db"))


def test_a_restarted_worker_that_never_gets_ready_is_killed_and_started_again(
    tmp_path: Path,
) -> None:
    supervisor, starts, metrics = _supervisor(tmp_path, "ready,hang,ready", ready_timeout_s=5.0)

    def steps(done: threading.Event) -> None:
        _until(lambda: len(supervisor.pids) == 1, 10, done)
        psutil.Process(supervisor.pids[0]).kill()
        # the restart hangs and is killed at its deadline; the one after it serves
        _until(lambda: len(_started(starts)) >= 3, 20, done)
        _until(lambda: supervisor.pids == [_started(starts)[-1]], 10, done)

    assert _supervise(supervisor, steps) == 0
    first, hung, *_ = _started(starts)
    assert not psutil.pid_exists(hung) or psutil.Process(hung).status() == psutil.STATUS_ZOMBIE
    assert _gauge_files(metrics, first) == _gauge_files(metrics, hung) == []


def test_sigterm_while_a_worker_starts_stops_the_supervisor_at_once(tmp_path: Path) -> None:
    supervisor, starts, metrics = _supervisor(tmp_path, "hang", ready_timeout_s=60.0)
    began = time.monotonic()
    assert (
        _supervise(supervisor, lambda done: _until(lambda: bool(_started(starts)), 10, done)) == 0
    )
    assert time.monotonic() - began < 10  # not the 60 s the worker had to get ready
    assert not psutil.pid_exists(_started(starts)[0])
    assert _gauge_files(metrics, _started(starts)[0]) == []


def test_a_worker_stuck_in_the_middle_of_a_line_does_not_hold_up_sigterm(tmp_path: Path) -> None:
    supervisor, starts, _ = _supervisor(tmp_path, "partial", ready_timeout_s=60.0)
    began = time.monotonic()

    def steps(done: threading.Event) -> None:
        _until(lambda: bool(_started(starts)), 10, done)
        time.sleep(1.0)  # the half line is written by now

    assert _supervise(supervisor, steps) == 0
    assert time.monotonic() - began < 10
    assert not psutil.pid_exists(_started(starts)[0])


def test_a_worker_that_exits_before_it_is_ready_fails_the_start(tmp_path: Path) -> None:
    supervisor, starts, _ = _supervisor(tmp_path, "exit", ready_timeout_s=60.0)
    began = time.monotonic()
    with pytest.raises(WorkerFailed, match="exit 3"):
        supervisor.run(lambda: None)
    assert time.monotonic() - began < 10
    assert len(_started(starts)) == 1
