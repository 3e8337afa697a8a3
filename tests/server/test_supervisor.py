"""The supervisor of `serve --workers N` with real worker processes: no wait without a bound."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from server.supervisor import Supervisor, WorkerFailed

# A stand-in for `run.py serve --worker`: the n-th start does what MODES[n] says (the last one
# repeats), then serves until SIGTERM.
WORKER = """
import os, pathlib, signal, sys, time
starts = pathlib.Path(os.environ["STARTS"])
before = starts.read_text() if starts.exists() else ""
n = len(before.split())
starts.write_text(before + f"{os.getpid()}\\n")
modes = os.environ["MODES"].split(",")
mode = modes[min(n, len(modes) - 1)]
if mode == "hang":
    time.sleep(600)
if mode == "exit":
    sys.exit(3)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


def _supervisor(tmp_path: Path, modes: str, ready_timeout_s: float) -> tuple[Supervisor, Path]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    starts = tmp_path / "starts"
    env = {**os.environ, "STARTS": str(starts), "MODES": modes}
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    supervisor = Supervisor(
        [sys.executable, str(script)], env, 1, 2.0, str(metrics), ready_timeout_s=ready_timeout_s
    )
    return supervisor, starts


def _started(starts: Path) -> list[int]:
    return [int(pid) for pid in starts.read_text().split()] if starts.exists() else []


def _in_background(steps: Callable[[], None]) -> threading.Thread:
    """Run `steps`, then SIGTERM this process (the supervisor's signal), whatever happened."""

    def run() -> None:
        try:
            steps()
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _until(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_a_restarted_worker_that_never_gets_ready_is_killed_and_started_again(
    tmp_path: Path,
) -> None:
    supervisor, starts = _supervisor(tmp_path, "ready,hang,ready", ready_timeout_s=1.0)
    seen: dict[str, object] = {}

    def steps() -> None:
        _until(lambda: len(supervisor.pids) == 1, 10)
        first = supervisor.pids[0]
        psutil.Process(first).kill()
        # the restart hangs, is killed at its deadline, and the next start serves
        _until(lambda: len(_started(starts)) == 3 and len(supervisor.pids) == 1, 15)
        _until(lambda: supervisor.pids[0] not in (first, _started(starts)[1]), 5)
        seen["hung"] = _started(starts)[1]
        seen["serving"] = supervisor.pids[0]

    background = _in_background(steps)
    assert supervisor.run(lambda: None) == 0
    background.join(5)
    assert seen["serving"] == _started(starts)[2]
    assert not psutil.pid_exists(int(str(seen["hung"]))) or (
        psutil.Process(int(str(seen["hung"]))).status() == psutil.STATUS_ZOMBIE
    )


def test_sigterm_while_a_worker_starts_stops_the_supervisor_at_once(tmp_path: Path) -> None:
    supervisor, starts = _supervisor(tmp_path, "hang", ready_timeout_s=60.0)
    ready: list[bool] = []
    background = _in_background(lambda: _until(lambda: bool(_started(starts)), 10))
    began = time.monotonic()
    assert supervisor.run(lambda: ready.append(True)) == 0
    assert time.monotonic() - began < 10  # not the 60 s the worker had to get ready
    background.join(5)
    assert ready == []
    assert not psutil.pid_exists(_started(starts)[0])


def test_a_worker_that_exits_before_it_is_ready_fails_the_start(tmp_path: Path) -> None:
    supervisor, starts = _supervisor(tmp_path, "exit", ready_timeout_s=60.0)
    began = time.monotonic()
    with pytest.raises(WorkerFailed, match="exit 3"):
        supervisor.run(lambda: None)
    assert time.monotonic() - began < 10
    assert len(_started(starts)) == 1
