"""Regressions found in review: each test pins one bug that a real client could hit."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import httpx
import jwt
import pytest

from protocol.errors import BadJson
from protocol.frames import decode_client_frame
from server.app import App
from server.batching import Done
from server.records import Avatar as StoredAvatar
from server.records import Switch, SwitchResult
from tests.client import Client
from tests.conftest import SECRET, AppFactory, ClientFactory, slow_client, with_avatar


async def test_cancel_sent_right_behind_its_chat_cancels_it(
    make_app: AppFactory, connect: ClientFactory
) -> None:
    _, client = await slow_client(make_app, connect, 50)
    for round_ in range(5):
        await client.send({"type": "chat", "id": f"c{round_}", "text": "a long story"})
        await client.send({"type": "cancel", "id": f"x{round_}"})
        answer = await client.recv_type("reply")
        assert (answer["ref"], answer["status"]) == (f"c{round_}", "cancelled")


async def test_cancel_then_next_chat_keeps_order_and_both_answers(
    make_app: AppFactory, connect: ClientFactory
) -> None:
    _, client = await slow_client(make_app, connect, 30)
    for round_ in range(5):
        await client.send({"type": "chat", "id": f"a{round_}", "text": "first"})
        await client.send({"type": "cancel"})
        await client.send({"type": "chat", "id": f"b{round_}", "text": "second"})
        first = await client.recv_type("reply")
        second = await client.recv_type("reply")
        assert (first["ref"], first["status"]) == (f"a{round_}", "cancelled")
        assert (second["ref"], second["status"]) == (f"b{round_}", "completed")
    history = await client.request({"type": "history", "limit": 100})
    assert len(history["messages"]) == 20  # every turn stored, the cancelled ones too


async def test_garbage_frames_cost_rate_tokens(
    make_app: AppFactory, connect: ClientFactory
) -> None:
    app = await make_app(rate_per_s=1, rate_burst=3, abuse_close_after=1000)
    client = await connect(target=app)
    for _ in range(6):
        await client.send_raw("not json at all")
    codes = [(await client.recv())["code"] for _ in range(6)]
    assert codes[:3] == ["bad_json"] * 3
    assert codes[3:] == ["rate_limited"] * 3


async def test_a_large_history_page_is_trimmed_not_a_slow_consumer(
    make_app: AppFactory, connect: ClientFactory
) -> None:
    app = await make_app(rate_per_s=10_000, rate_burst=10_000)
    client = await connect(target=app)
    await with_avatar(client)
    for index in range(50):  # control characters escape to 6 bytes each in JSON
        await client.request({"type": "chat", "text": f"{index}" + "\u0001" * 3990})
    page = await client.request({"type": "history", "limit": 100})
    assert page["type"] == "history"
    assert 0 < len(page["messages"]) < 100
    assert page["messages"][-1]["role"] == "assistant"  # the newest are kept
    older = await client.request(
        {"type": "history", "limit": 100, "before": page["messages"][0]["id"]}
    )
    assert older["messages"]  # the rest is one page further back
    assert (await client.request({"type": "ping"}))["type"] == "pong"


async def test_token_whose_sub_is_not_unicode_is_refused_and_leaves_no_trace(app: App) -> None:
    token = jwt.encode({"sub": "\ud800x", "iat": int(time.time())}, SECRET, algorithm="HS256")
    for _ in range(20):  # more than the per-user limit: nothing may leak into the hub
        async with Client(app.url) as client:
            await client.send({"type": "hello", "token": token})
            await client.conn.wait_closed()
            assert client.conn.close_code == 4401


def test_nan_and_infinity_are_not_json() -> None:
    for raw in ('{"type":"ping","id":"a","pad":NaN}', '{"type":"history","limit":Infinity}'):
        with pytest.raises(BadJson):
            decode_client_frame(raw)


async def test_over_long_static_path_is_404(app: App) -> None:
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.get(f"http://127.0.0.1:{app.port}/static/{'a' * 5000}")
    assert response.status_code == 404


async def test_switch_answered_after_a_listener_reconnect_does_not_refill_a_stale_cache(
    app: App, connect: ClientFactory, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listener drops while this session's switch commits, another process's switch is
    missed meanwhile, and the listener is back (every cache emptied) before this switch is
    answered: the next chat must read the avatar, not reuse the row this switch committed."""
    user = f"stale-{uuid.uuid4().hex[:8]}"
    client = await connect(user)
    await with_avatar(client, "friendly")
    store = app.services.store
    add_switch = store.add_switch
    answers: list[asyncio.Task[None]] = []

    def add_switch_across_a_reconnect(switch: Switch, done: Done[SwitchResult | None]) -> None:
        app._on_listener_state(False)

        async def answer_after_a_missed_switch(
            result: SwitchResult | None, error: BaseException | None
        ) -> None:
            conn = await asyncpg.connect(database_url)
            try:  # another process's switch, whose notification is lost with the listener
                await conn.execute(
                    "UPDATE avatars SET personality = 'witty', version = version + 1"
                    " WHERE user_id = $1",
                    switch.user_id,
                )
            finally:
                await conn.close()
            app._on_listener_state(True)
            done(result, error)

        def committed(result: SwitchResult | None, error: BaseException | None) -> None:
            answers.append(asyncio.create_task(answer_after_a_missed_switch(result, error)))

        add_switch(switch, committed)

    monkeypatch.setattr(store, "add_switch", add_switch_across_a_reconnect)
    ack = await client.request({"type": "set_persona", "personality": "romantic"})
    assert ack["type"] == "persona_set"
    monkeypatch.setattr(store, "add_switch", add_switch)
    await client.send({"type": "chat", "id": "m1", "text": "which persona now?"})
    reply = await client.recv_type("reply")
    assert reply["persona"] == "witty"


async def test_a_chat_read_after_another_connections_change_waits_for_the_switch_in_flight(
    app: App, connect: ClientFactory, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This connection's switch commits, then another process's switch does, and its
    notification arrives before this switch is answered. A chat read meanwhile must not take
    this switch's persona, which is no longer the avatar's: it waits, then reads the avatar."""
    user = f"contested-{uuid.uuid4().hex[:8]}"
    client = await connect(user)
    await with_avatar(client, "friendly")
    store = app.services.store
    add_switch = store.add_switch
    release = asyncio.Event()
    held: list[asyncio.Task[None]] = []

    def add_switch_answered_late(switch: Switch, done: Done[SwitchResult | None]) -> None:
        async def answer_after_a_later_switch(
            result: SwitchResult | None, error: BaseException | None
        ) -> None:
            conn = await asyncpg.connect(database_url)
            try:  # another process switches after this switch committed, and notifies
                await conn.execute(
                    "WITH changed AS (UPDATE avatars SET personality = 'witty',"
                    " version = version + 1 WHERE user_id = $1 RETURNING version)"
                    " SELECT pg_notify('persona_changed', json_build_object('user_id', $1::text,"
                    " 'personality', 'witty', 'previous', 'romantic', 'version', version,"
                    " 'origin', 'another-process')::text) FROM changed",
                    user,
                )
            finally:
                await conn.close()
            await release.wait()
            done(result, error)

        def committed(result: SwitchResult | None, error: BaseException | None) -> None:
            held.append(asyncio.create_task(answer_after_a_later_switch(result, error)))

        add_switch(switch, committed)

    monkeypatch.setattr(store, "add_switch", add_switch_answered_late)
    await client.send({"type": "set_persona", "id": "s1", "personality": "romantic"})
    pushed = await client.recv_type("persona_changed")
    assert pushed["personality"] == "witty"
    await client.send({"type": "chat", "id": "m1", "text": "which persona now?"})
    await asyncio.sleep(0.3)  # the chat is read while the switch is still unanswered
    release.set()
    answers: dict[str, str] = {}
    while len(answers) < 2:
        frame = await client.recv()
        if frame["type"] in ("persona_set", "reply"):
            answers[frame["type"]] = frame.get("persona") or frame["personality"]
    assert answers == {"persona_set": "romantic", "reply": "witty"}


async def test_a_change_notified_while_the_avatar_is_read_is_not_rendered_over(
    app: App, connect: ClientFactory, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chat reads the avatar; before that read's answer is used, another process commits a
    switch and its notification arrives (pushed to the client). The row the read returned is
    now older than what the client was told: the chat must read again, not render over it."""
    user = f"readrace-{uuid.uuid4().hex[:8]}"
    client = await connect(user)
    await with_avatar(client, "friendly")
    store = app.services.store
    get_avatar = store.get_avatar

    async def read_then_a_change(user_id: str) -> StoredAvatar | None:
        avatar = await get_avatar(user_id)  # the row as it is before the other switch
        monkeypatch.setattr(store, "get_avatar", get_avatar)  # later reads are plain
        await _switched_elsewhere(app, database_url, user_id, "witty", "friendly")
        return avatar

    app.services.hub.clear_all_caches()  # so that the chat reads the avatar
    monkeypatch.setattr(store, "get_avatar", read_then_a_change)
    await client.send({"type": "chat", "id": "m1", "text": "which persona now?"})
    pushed = await client.recv_type("persona_changed")
    assert pushed["personality"] == "witty"
    reply = await client.recv_type("reply")
    assert reply["persona"] == "witty"


async def test_an_avatar_whose_version_went_back_is_still_answered(
    app: App, connect: ClientFactory, database_url: str
) -> None:
    """The row's version goes back (a restored database), to 1: chats are answered with the
    avatar as it is, not refused as older than what the session saw, and the client is told of
    the change before the first such reply."""
    user = f"goneback-{uuid.uuid4().hex[:8]}"
    client = await connect(user)
    await with_avatar(client, "friendly")
    for personality in ("witty", "caring", "playful"):
        ack = await client.request({"type": "set_persona", "personality": personality})
        assert ack["type"] == "persona_set"
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE avatars SET personality = 'romantic', version = 1 WHERE user_id = $1", user
        )
    finally:
        await conn.close()
    app.services.hub.clear_all_caches()
    await client.send({"type": "chat", "id": "back", "text": "still there?"})
    first = await client.recv()
    assert (first["type"], first["personality"], first["previous"]) == (
        "persona_changed", "romantic", "playful",
    )  # fmt: skip
    assert (await client.recv())["persona"] == "romantic"
    reply = await client.request({"type": "chat", "text": "still there?"})
    assert (reply["type"], reply["persona"]) == ("reply", "romantic")


async def test_an_avatar_created_while_a_switch_is_notified_is_not_cached_over_it(
    app: App, connect: ClientFactory, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Right after this connection creates the avatar, another process switches it, and the
    notification arrives before the create's answer: the next chat has the switched persona."""
    user = f"createrace-{uuid.uuid4().hex[:8]}"
    client = await connect(user)
    store = app.services.store
    create_avatar = store.create_avatar

    async def create_then_a_switch(user_id: str, name: str, personality: str) -> StoredAvatar:
        avatar = await create_avatar(user_id, name, personality)
        await _switched_elsewhere(app, database_url, user_id, "witty", personality)
        return avatar

    monkeypatch.setattr(store, "create_avatar", create_then_a_switch)
    created = await client.request(
        {"type": "create_avatar", "name": "Ava", "personality": "friendly"}
    )
    assert created["type"] == "avatar"
    reply = await client.request({"type": "chat", "text": "which persona now?"})
    assert (reply["type"], reply["persona"]) == ("reply", "witty")


async def _switched_elsewhere(
    app: App, database_url: str, user: str, personality: str, previous: str
) -> None:
    """Another process switches `user` to `personality` and notifies, as the server's statement
    does; return once this app has received the notification."""

    def notifications() -> float:
        return app.metrics.registry.get_sample_value("chat_persona_notifications_total") or 0.0

    seen = notifications()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "WITH changed AS (UPDATE avatars SET personality = $2,"
            " version = version + 1 WHERE user_id = $1 RETURNING version)"
            " SELECT pg_notify('persona_changed', json_build_object('user_id', $1::text,"
            " 'personality', $2::text, 'previous', $3::text, 'version', version,"
            " 'origin', 'another-process')::text) FROM changed",
            user,
            personality,
            previous,
        )
    finally:
        await conn.close()
    async with asyncio.timeout(10):
        while notifications() <= seen:
            await asyncio.sleep(0.01)
