"""Several server processes on one PostgreSQL: persona changes reach every connection."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from server.notify import APPLICATION_NAME
from tests.client import Client, login
from tests.conftest import SECRET, with_avatar
from tests.processes import Served, clean_env, serve


@pytest.fixture
async def two_servers(database_url: str, tmp_path: Path) -> AsyncIterator[tuple[Served, Served]]:
    env = clean_env(DATABASE_URL=database_url, CHAT_JWT_SECRET=SECRET)
    first = await serve(log_path=tmp_path / "a.log", env=env)
    second = await serve(log_path=tmp_path / "b.log", env=env)
    try:
        yield first, second
    finally:
        assert await first.stop() == 0
        assert await second.stop() == 0


async def _pair(servers: tuple[Served, Served]) -> tuple[Client, Client]:
    user = f"scale-{uuid.uuid4().hex[:10]}"
    on_a = await login(servers[0].url, SECRET, user)
    on_b = await login(servers[1].url, SECRET, user)
    await with_avatar(on_a, "friendly")
    assert (await on_b.request({"type": "chat", "text": "warm the cache"}))["persona"] == "friendly"
    return on_a, on_b


async def _switch_and_time(on_a: Client, on_b: Client, persona: str) -> float:
    """Switch on A; return seconds from A's persona_set to B's persona_changed."""
    await on_a.send({"type": "set_persona", "id": "s", "personality": persona})
    acked = await on_a.recv_type("persona_set")
    acked_at = time.perf_counter()
    pushed = await on_b.recv_type("persona_changed")
    assert (acked["personality"], pushed["personality"]) == (persona, persona)
    return time.perf_counter() - acked_at


async def test_switch_on_one_process_reaches_the_other(two_servers: tuple[Served, Served]) -> None:
    on_a, on_b = await _pair(two_servers)
    delays = []
    for persona in ["witty", "caring", "playful", "romantic", "professional", "friendly"] * 5:
        delays.append(await _switch_and_time(on_a, on_b, persona))
        reply = await on_b.request({"type": "chat", "text": "which one now?"})
        assert reply["persona"] == persona
    delays.sort()
    print(
        f"\npersona_set on A -> persona_changed on B over {len(delays)} switches: "
        f"p50 {statistics.median(delays) * 1000:.2f} ms, "
        f"p99 {delays[int(0.99 * (len(delays) - 1))] * 1000:.2f} ms, max {delays[-1] * 1000:.2f} ms"
    )
    await on_a.__aexit__(None, None, None)
    await on_b.__aexit__(None, None, None)


async def test_reply_stays_correct_while_the_listener_is_down_and_it_comes_back(
    two_servers: tuple[Served, Served], database_url: str
) -> None:
    on_a, on_b = await _pair(two_servers)
    listener = f"{APPLICATION_NAME}:{two_servers[1].pid}"
    conn = await asyncpg.connect(database_url)
    try:
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = $1",
            listener,
        )
        assert killed == 1
        await on_a.request({"type": "set_persona", "personality": "witty"})
        # B missed the notification, but does not trust its cache while the listener is down
        assert (await on_b.request({"type": "chat", "text": "still you?"}))["persona"] == "witty"
        async with asyncio.timeout(10):
            while not await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", listener
            ):
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        await on_a.request({"type": "set_persona", "personality": "caring"})
        pushed = await on_b.recv_type("persona_changed")
        assert pushed["personality"] == "caring"
        assert (await on_b.request({"type": "chat", "text": "and now?"}))["persona"] == "caring"
    finally:
        await conn.close()
        await on_a.__aexit__(None, None, None)
        await on_b.__aexit__(None, None, None)
