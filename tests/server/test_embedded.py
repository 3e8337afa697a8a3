"""The embedded PostgreSQL's keeper: restarts within a deadline, and a stop that stops the
postmaster running now, whoever started it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from server.embedded import EmbeddedPostgres, Keeper
from tests.processes import ROOT


def _postmaster(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().splitlines()[0])


def _kill_postmaster(pgdata: Path) -> None:
    pid = _postmaster(pgdata)
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return
        time.sleep(0.01)
    raise AssertionError("the postmaster outlived SIGKILL")


def _postgres_of(pgdata: Path) -> list[int]:
    """The live postgres processes serving `pgdata`."""
    found = []
    for process in psutil.process_iter(["name", "cmdline", "status"]):
        info = process.info
        serving = info["name"] == "postgres" and str(pgdata) in " ".join(info["cmdline"] or [])
        if serving and info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process.pid)
    return found


@pytest.fixture
def pg(tmp_path: Path) -> EmbeddedPostgres:
    pg = EmbeddedPostgres(tmp_path / "pgdata")
    pg.start()
    return pg


def test_a_restart_over_its_deadline_is_killed_and_the_keeper_tries_again(
    pg: EmbeddedPostgres,
) -> None:
    try:
        _kill_postmaster(pg.pgdata)
        assert not pg.alive()
        with pytest.raises(subprocess.TimeoutExpired):
            pg.restart(deadline_s=0.05)  # the child process cannot even start in time
        keeper = Keeper(pg, interval_s=0.05)
        deadline = time.monotonic() + 60
        while not pg.alive() and time.monotonic() < deadline:
            keeper.check()
            time.sleep(0.05)
        assert pg.alive() and keeper.restarts <= 1
    finally:
        pg.stop()  # the killed child left its handle behind: stop() must still stop it
    assert _postgres_of(pg.pgdata) == []


def test_stop_stops_the_postmaster_another_process_started(pg: EmbeddedPostgres) -> None:
    first = _postmaster(pg.pgdata)
    _kill_postmaster(pg.pgdata)
    subprocess.run(  # another process (a second server's keeper, say) starts it again
        [sys.executable, "-m", "server.embedded", str(pg.pgdata)], check=True, cwd=ROOT, timeout=60
    )
    now = _postmaster(pg.pgdata)
    assert pg.alive() and now != first and now in _postgres_of(pg.pgdata)
    assert pg.postmaster_pid == first  # what this process knew
    pg.adopt()  # which stop() does first
    assert pg.postmaster_pid == now
    pg.stop()
    assert _postgres_of(pg.pgdata) == []


async def test_the_keeper_watches_until_cancelled(pg: EmbeddedPostgres) -> None:
    keeper = Keeper(pg, interval_s=0.05)
    watching = asyncio.create_task(keeper.watch())
    try:
        _kill_postmaster(pg.pgdata)
        async with asyncio.timeout(60):
            while keeper.restarts == 0:
                await asyncio.sleep(0.05)
        assert pg.alive()
    finally:
        watching.cancel()
        await asyncio.to_thread(pg.stop)
    assert _postgres_of(pg.pgdata) == []
