"""End to end: avatar, chat, persona switch, history, over a real server and PostgreSQL."""

from __future__ import annotations

from tests.client import Client
from tests.conftest import ClientFactory, with_avatar


async def test_welcome_describes_the_session(connect: ClientFactory) -> None:
    client = await connect()
    welcome = client.welcome
    assert welcome["type"] == "welcome"
    assert welcome["protocol"] == 1
    assert welcome["avatar"] is None
    assert [p["id"] for p in welcome["personas"]] == [
        "friendly", "playful", "caring", "witty", "professional", "romantic",
    ]  # fmt: skip
    assert welcome["limits"] == {
        "max_frame_bytes": 65536,
        "max_text_chars": 4000,
        "rate_per_s": 20.0,
        "rate_burst": 40,
    }
    assert welcome["ref"] == "c1"
    assert len(welcome["session_id"]) == 32


async def test_chat_gets_a_reply_in_the_avatars_persona(connect: ClientFactory) -> None:
    client = await connect()
    await with_avatar(client, "playful")
    reply = await client.request({"type": "chat", "text": "I baked bread today"})
    assert reply["type"] == "reply"
    assert reply["persona"] == "playful"
    assert reply["status"] == "completed"
    assert "baked bread today" in reply["text"]
    assert reply["reply_id"] > reply["message_id"]


async def test_chat_pipelined_after_set_persona_uses_new_persona(connect: ClientFactory) -> None:
    client: Client = await connect()
    await with_avatar(client, "friendly")
    await client.send({"type": "set_persona", "id": "s1", "personality": "witty"})
    await client.send({"type": "chat", "id": "m1", "text": "hello there"})
    first = await client.recv()
    second = await client.recv()
    assert (first["type"], first["ref"], first["personality"], first["previous"]) == (
        "persona_set", "s1", "witty", "friendly",
    )  # fmt: skip
    assert (second["type"], second["ref"], second["persona"]) == ("reply", "m1", "witty")
