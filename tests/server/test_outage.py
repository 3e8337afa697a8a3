"""A database outage: `unavailable` and /readyz 503 meanwhile, recovery without a restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from server.app import App
from server.auth import mint_token
from server.embedded import EmbeddedPostgres
from tests.client import Client, login
from tests.conftest import SECRET, settings_for_tests, with_avatar


@pytest.fixture
async def own_database(tmp_path: Path) -> AsyncIterator[EmbeddedPostgres]:
    """A PostgreSQL of this test's own, so that it can be stopped without harming the others."""
    pg = EmbeddedPostgres(tmp_path / "pgdata")
    await asyncio.to_thread(pg.start)
    yield pg
    await asyncio.to_thread(pg.stop)


async def _readyz(app: App) -> int:
    async with httpx.AsyncClient(timeout=10) as http:
        return (await http.get(f"http://127.0.0.1:{app.port}/readyz")).status_code


async def test_outage_answers_unavailable_and_recovers(own_database: EmbeddedPostgres) -> None:
    dsn = await asyncio.to_thread(own_database.start)
    app = App(settings_for_tests(db_timeout_s=1.0), dsn, SECRET)
    await app.start()
    client = await login(app.url, SECRET, "outage-user")
    try:
        await with_avatar(client, "caring")
        assert (await client.request({"type": "chat", "text": "before"}))["type"] == "reply"

        await asyncio.to_thread(own_database.stop)
        started = time.monotonic()
        answer = await client.request({"type": "chat", "text": "during"})
        assert (answer["type"], answer["code"], answer["status"]) == ("error", "unavailable", 503)
        assert time.monotonic() - started < 5
        assert (await client.request({"type": "history"}))["code"] == "unavailable"
        assert (await client.request({"type": "ping"}))["type"] == "pong"
        assert await _readyz(app) == 503
        async with Client(app.url) as newcomer:  # a hello needs the database: close 1011
            await newcomer.send({"type": "hello", "token": mint_token(SECRET, "outage-new")})
            await newcomer.conn.wait_closed()
            assert (newcomer.conn.close_code, newcomer.conn.close_reason) == (
                1011, "database unavailable",
            )  # fmt: skip

        await asyncio.to_thread(own_database.start)
        back = time.monotonic()
        while True:
            answer = await client.request({"type": "chat", "text": "after"})
            if answer["type"] == "reply" or time.monotonic() - back > 10:
                break
            await asyncio.sleep(0.1)
        assert (answer["type"], answer["persona"]) == ("reply", "caring")
        assert await _readyz(app) == 200
    finally:
        await client.__aexit__(None, None, None)
        await app.stop()
