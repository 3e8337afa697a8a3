"""`serve --workers N`: several processes on one port, restarted when they die, drained together."""

from __future__ import annotations

import asyncio
import functools
import signal
from pathlib import Path

import httpx
import psutil

from clients.bots.load import LoadConfig, run_load
from clients.bots.plan import BotPlan
from server.auth import mint_token
from tests.client import Client, login
from tests.conftest import with_avatar
from tests.processes import Served, run_py, serve


def _workers(served: Served) -> list[psutil.Process]:
    """The live worker processes under the supervisor."""
    found = []
    for child in psutil.Process(served.pid).children():
        try:
            if "--worker" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:
            continue  # it just died
    return found


async def _metric(port: int, name: str) -> float:
    async with httpx.AsyncClient(timeout=5) as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_two_workers_serve_restart_and_drain(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    served = await serve("--workers", "2", "--data-dir", str(data_dir), log_path=tmp_path / "w.log")
    clients: list[Client] = []
    try:
        assert "(2 workers)" in served.banner
        workers = _workers(served)
        assert len(workers) == 2
        _, token_line, _ = await run_py("token", "unused", "--data-dir", str(data_dir))
        assert token_line.strip()
        secret = (data_dir / "jwt_secret").read_text().strip()
        for index in range(6):
            client = await login(served.url, secret, f"worker-user-{index}")
            await with_avatar(client, "witty")
            assert (await client.request({"type": "chat", "text": "hi"}))["persona"] == "witty"
            clients.append(client)
        # every scrape sums both workers, whichever worker answers it
        assert {await _metric(served.port, "chat_connections_open") for _ in range(4)} == {6.0}

        workers[0].kill()
        async with asyncio.timeout(20):
            while len(now := _workers(served)) < 2 or workers[0].pid in {w.pid for w in now}:
                await asyncio.sleep(0.1)
        fresh = await login(served.url, secret, "after-restart")
        await with_avatar(fresh, "caring")
        assert (await fresh.request({"type": "chat", "text": "back?"}))["persona"] == "caring"
        clients.append(fresh)

        # bots sharing users across both workers: every switch must reach the other worker
        plan = BotPlan(url=served.url, switch_every=3)
        token_for = functools.partial(mint_token, secret)
        report = await run_load(LoadConfig(plan=plan, clients=12, users=4, duration_s=3.0,
                                           ramp_s=0.5, token_for=token_for))  # fmt: skip
        print(f"\nbots on 2 workers: {report['totals']}")
        assert report["totals"]["replies"] > 0 and report["totals"]["switch_acks"] > 0
        assert (report["totals"]["stale_renders"], report["ok"]) == (0, True)
    finally:
        for client in clients:
            await client.__aexit__(None, None, None)
        code = await served.stop(signal.SIGTERM)
    assert code == 0
    assert not (data_dir / "pgdata" / "postmaster.pid").exists()
