"""Regressions found in review: each test pins one bug that a real client could hit."""

from __future__ import annotations

import time

import httpx
import jwt
import pytest

from protocol.errors import BadJson
from protocol.frames import decode_client_frame
from server.app import App
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


# The races of persona switches, reads and notifications that were tested here through a real
# server with a patched store are rules of the conversation now: tests/protocol/conversation/.
