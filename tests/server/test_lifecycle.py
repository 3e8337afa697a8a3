"""Graceful shutdown: replies in flight finish, sessions close with 1001, nothing is lost."""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import AppFactory, ClientFactory, slow_client


async def test_stop_lets_the_reply_in_flight_finish_then_closes_1001(
    make_app: AppFactory, connect: ClientFactory
) -> None:
    app, client = await slow_client(make_app, connect, 100)
    await client.send({"type": "chat", "id": "last", "text": "finish this please"})
    await client.recv_type("reply_delta")
    stopping = asyncio.create_task(app.stop())
    reply = await client.recv_type("reply")
    assert (reply["ref"], reply["status"]) == ("last", "completed")
    with pytest.raises(ConnectionClosed):
        await client.recv()
    assert client.conn.close_code == 1001
    await stopping


async def test_stop_refuses_new_connections(make_app: AppFactory) -> None:
    app = await make_app()
    url = app.url
    await app.stop()
    with pytest.raises((OSError, InvalidStatus)):
        async with ws_connect(url, open_timeout=2):
            pass


async def test_chat_sent_while_draining_is_unavailable(
    make_app: AppFactory, connect: ClientFactory
) -> None:
    app, client = await slow_client(make_app, connect, 150)
    await client.send({"type": "chat", "id": "first", "text": "one"})
    await client.recv_type("reply_delta")
    stopping = asyncio.create_task(app.stop())
    await asyncio.sleep(0.05)
    await client.send({"type": "chat", "id": "late", "text": "two"})
    answers: dict[str, dict[str, object]] = {}
    while len(answers) < 2:
        frame = await client.recv()
        if frame["type"] in ("reply", "error"):
            answers[frame["ref"]] = frame
    assert answers["first"]["status"] == "completed"
    assert (answers["late"]["code"], answers["late"]["status"]) == ("unavailable", 503)
    await stopping
