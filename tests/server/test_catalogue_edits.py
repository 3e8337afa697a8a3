"""The catalogue's guarantee across processes: once an edit is confirmed by every process, no
reply anywhere is rendered with the old card, while bots chat and switch on both."""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from clients.bots.load import LoadConfig, run_load
from clients.bots.plan import BotPlan
from protocol.cards import parse_card
from server.auth import mint_token
from server.catalogue import ACK_CHANNEL, RELOADED, Confirmations
from server.personas_admin import import_cards, set_enabled
from tests.client import Client, login
from tests.conftest import SECRET, with_avatar
from tests.processes import Served, clean_env, serve

EDITS = 5


def card(name: str, version: int) -> dict[str, Any]:
    """A V3 card whose every reply ends with its version's marker."""
    return {
        "spec": "chara_card_v3",
        "spec_version": "3.0",
        "data": {
            "name": name,
            "description": "A persona that says which version of its card it is.",
            "first_mes": "Hello.",
            "extensions": {"persona_chat": {"sign_off": f"Card version {version}."}},
        },
    }


def version_of(text: str) -> int:
    marker = text.rsplit("Card version ", 1)
    assert len(marker) == 2, text
    return int(marker[1].rstrip("."))


async def save(conn: asyncpg.Connection, persona: str, value: dict[str, Any]) -> int:
    """Import the card as `run.py personas import --replace` does, and return its new version
    once every server process has confirmed it."""
    result = await import_cards(
        conn, [("test", parse_card(value))], chosen_id=persona, replace_existing=True, timeout_s=10
    )
    assert result.outcome.missing == (), f"not confirmed by {result.outcome.missing}"
    return result.imported[0].version


@pytest.fixture
async def two_processes(database_url: str, tmp_path: Path) -> AsyncIterator[tuple[Served, Served]]:
    env = clean_env(
        DATABASE_URL=database_url,
        CHAT_JWT_SECRET=SECRET,
        CHAT_RATE_PER_S="100000",
        CHAT_RATE_BURST="100000",
    )
    servers = [await serve(log_path=tmp_path / f"{name}.log", env=env) for name in "ab"]
    try:
        yield servers[0], servers[1]
    finally:
        for server in servers:
            assert await server.stop() == 0
        for log in ("a.log", "b.log"):
            text = (tmp_path / log).read_text()
            assert "Traceback" not in text and " ERROR " not in text, text[-3000:]


async def chat_on(
    client: Client, log: list[tuple[float, dict[str, Any]]], stop: asyncio.Event
) -> None:
    """Chat in a closed loop; log each answer with the moment its chat was sent."""
    index = 0
    while not stop.is_set():
        index += 1
        sent_at = time.monotonic()
        answer = await client.request({"type": "chat", "text": f"tell me, number {index}"})
        log.append((sent_at, answer))


async def test_no_process_renders_an_old_card_once_an_edit_is_confirmed(
    two_processes: tuple[Served, Served], database_url: str
) -> None:
    persona = f"edit-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(database_url)
    try:
        acked = [(0.0, await save(conn, persona, card("Versioned", 1)))]
        a, b = two_processes
        checkers: list[Client] = []
        for server in (a, b):
            for _ in range(2):
                client = await login(server.url, SECRET, f"check-{uuid.uuid4().hex[:8]}")
                await with_avatar(client, persona)
                checkers.append(client)
        logs: list[list[tuple[float, dict[str, Any]]]] = [[] for _ in checkers]
        stop = asyncio.Event()
        bots = asyncio.create_task(
            run_load(
                LoadConfig(
                    plan=BotPlan(url=a.url, switch_every=3, invalid_every=0),
                    urls=(a.url, b.url),
                    clients=16,
                    users=8,
                    duration_s=6.0,
                    ramp_s=0.2,
                    token_for=functools.partial(mint_token, SECRET),
                )
            )
        )
        chatting = [
            asyncio.create_task(chat_on(c, log, stop))
            for c, log in zip(checkers, logs, strict=True)
        ]
        for edit in range(2, EDITS + 2):
            await asyncio.sleep(0.6)
            version = await save(conn, persona, card("Versioned", edit))
            acked.append((time.monotonic(), version))
        report = await bots  # (they would switch to it, and chat as it, once it is disabled)
        # disabled: the avatars keep it, and every chat after the confirmation is refused
        disabled = await set_enabled(conn, persona, False, timeout_s=10)
        assert disabled.changed and disabled.outcome.missing == ()
        disabled_at = time.monotonic()
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*chatting)
    finally:
        await conn.close()
    assert report["errors"] == {} and report["totals"]["stale_renders"] == 0, report["errors"]
    assert report["totals"]["replies"] > 0
    checked = 0
    for log in logs:
        for sent_at, answer in log:
            newest = max(version for at, version in acked if at <= sent_at)
            if sent_at > disabled_at:
                assert answer["type"] == "error" and answer["code"] == "persona_unavailable", answer
                continue
            if answer["type"] == "error":
                # sent before the disable was confirmed, answered after it was committed
                assert answer["code"] == "persona_unavailable" and sent_at > acked[-1][0], answer
                continue
            assert answer["type"] == "reply" and answer["persona"] == persona, answer
            assert version_of(answer["text"]) >= newest, (sent_at, answer, acked)
            checked += 1
    assert checked > 50  # every edit had replies after it on both processes
    for sent_before, (at, version) in itertools.pairwise(acked):
        after = [
            version_of(answer["text"])
            for log in logs
            for sent_at, answer in log
            if at < sent_at and answer["type"] == "reply"
        ]
        assert after and min(after) >= version, (sent_before, version)
    for client in checkers:
        await client.__aexit__(None, None, None)


def test_a_whole_read_after_the_edit_confirms_it_and_one_before_does_not() -> None:
    heard = Confirmations()
    edited_at = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
    heard._since = edited_at  # what wait() sets: the database's time right after the commit

    def ack(payload: dict[str, Any]) -> None:
        heard.heard(None, 0, ACK_CHANNEL, orjson.dumps(payload).decode())

    ack({"id": "witty", "version": 3, "listener": "a"})
    ack({"id": "witty", "version": 2, "listener": "b"})  # an older edit
    before, after = edited_at - timedelta(milliseconds=1), edited_at + timedelta(milliseconds=1)
    ack({"id": RELOADED, "read_at": before.isoformat(), "listener": "c"})
    ack({"id": RELOADED, "read_at": after.isoformat(), "listener": "d"})  # its listener is back
    ack({"id": "witty", "version": "x", "listener": "e"})  # malformed: ignored
    assert heard.confirmed("witty", 3) == {"a", "d"}
    assert heard.confirmed("caring", 7) == {"d"}
