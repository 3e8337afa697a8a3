"""Several server processes on one PostgreSQL: persona changes reach every connection."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from server.notify import APPLICATION_NAME
from tests.client import Client, login
from tests.conftest import SECRET, with_avatar
from tests.processes import Served, clean_env, serve


@pytest.fixture
async def two_servers(database_url: str, tmp_path: Path) -> AsyncIterator[tuple[Served, Served]]:
    env = clean_env(
        DATABASE_URL=database_url,
        CHAT_JWT_SECRET=SECRET,
        CHAT_RATE_PER_S="100000",  # 120 switches as fast as they go: the limit is not under test
        CHAT_RATE_BURST="100000",
    )
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


async def _switch_and_time(on_a: Client, on_b: Client, persona: str) -> tuple[float, float]:
    """Switch on A; return seconds to B's persona_changed from A's persona_set and from the send."""
    sent_at = time.perf_counter()
    await on_a.send({"type": "set_persona", "id": "s", "personality": persona})
    acked = await on_a.recv_type("persona_set")
    acked_at = time.perf_counter()
    pushed = await on_b.recv_type("persona_changed")
    pushed_at = time.perf_counter()
    assert (acked["personality"], pushed["personality"]) == (persona, persona)
    return pushed_at - acked_at, pushed_at - sent_at


def _quantiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[int(0.99 * (len(ordered) - 1))]
    return f"p50 {statistics.median(ordered) * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms"


async def test_switch_on_one_process_reaches_the_other(two_servers: tuple[Served, Served]) -> None:
    on_a, on_b = await _pair(two_servers)
    from_ack, from_send = [], []
    for persona in ["witty", "caring", "playful", "romantic", "professional", "friendly"] * 20:
        after_ack, after_send = await _switch_and_time(on_a, on_b, persona)
        from_ack.append(after_ack)
        from_send.append(after_send)
        reply = await on_b.request({"type": "chat", "text": "which one now?"})
        assert reply["persona"] == persona
    print(
        f"\npersona_changed on B over {len(from_ack)} switches on A: after A's persona_set "
        f"{_quantiles(from_ack)}; after A sent set_persona {_quantiles(from_send)}"
    )
    await on_a.__aexit__(None, None, None)
    await on_b.__aexit__(None, None, None)


async def test_reply_stays_correct_while_the_listener_is_down_and_it_comes_back(
    two_servers: tuple[Served, Served], database_url: str
) -> None:
    on_a, on_b = await _pair(two_servers)
    listener = f"{APPLICATION_NAME}:{two_servers[1].pid}-%"  # the process's tag
    conn = await asyncpg.connect(database_url)
    try:
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name LIKE $1",
            listener,
        )
        assert killed == 1
        await on_a.request({"type": "set_persona", "personality": "witty"})
        # B missed the notification, but does not trust its cache while the listener is down;
        # the load that finds the new persona also tells the client, before the reply
        await on_b.send({"type": "chat", "id": "after-outage", "text": "still you?"})
        seen: list[dict[str, Any]] = []
        while not seen or seen[-1]["type"] != "reply":
            seen.append(await on_b.recv())
        assert [(f["type"], f.get("personality") or f.get("persona")) for f in seen] == [
            ("persona_changed", "witty"),
            ("reply", "witty"),
        ]
        async with asyncio.timeout(10):
            while not await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE $1", listener
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
