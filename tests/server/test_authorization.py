"""The authorization matrix: two users, every frame type, stolen refs and made-up ids."""

from __future__ import annotations

import asyncpg

from tests.client import Client
from tests.conftest import ClientFactory, with_avatar

HOSTILE = [
    "'; DROP TABLE messages; --",
    'Robert"); DELETE FROM avatars WHERE ("1"="1',
    "\\x00 \\' %s %(name)s $1 $$ E'\\n'",
    "🙂 ünïcödé \u202e mirrored \t tabs \n newlines",
    "a" * 3999 + "!",
]


async def _history(client: Client) -> list[dict[str, object]]:
    messages = (await client.request({"type": "history", "limit": 100}))["messages"]
    assert isinstance(messages, list)
    return messages


async def test_no_frame_reads_or_writes_another_users_data(connect: ClientFactory) -> None:
    alice = await connect()
    bob = await connect()
    await with_avatar(alice, "romantic")
    await with_avatar(bob, "professional")
    alice_reply = await alice.request({"type": "chat", "id": "shared-id", "text": "alice only"})
    alice_before = await _history(alice)

    # Bob reuses Alice's chat id (a stolen ref): his own, separate message, not a replay
    bob_reply = await bob.request({"type": "chat", "id": "shared-id", "text": "alice only"})
    assert bob_reply["type"] == "reply" and "replayed" not in bob_reply
    assert bob_reply["message_id"] != alice_reply["message_id"]
    # made-up and foreign ids in history.before only page through Bob's own messages
    for before in (alice_reply["reply_id"], alice_reply["message_id"], 1, 2**62):
        page = await bob.request({"type": "history", "before": before, "limit": 100})
        assert all(m["text"] != "alice only" or m["id"] == bob_reply["message_id"]
                   for m in page["messages"])  # fmt: skip
        assert all(m["id"] in (bob_reply["message_id"], bob_reply["reply_id"])
                   for m in page["messages"])  # fmt: skip
    # Bob's switches, avatar reads and cancels touch only Bob
    await bob.request({"type": "set_persona", "personality": "witty"})
    assert (await bob.request({"type": "get_avatar"}))["avatar"]["personality"] == "witty"
    assert (await bob.request({"type": "cancel"}))["code"] == "nothing_to_cancel"
    assert (await bob.request({"type": "create_avatar", "name": "X", "personality": "witty"}))[
        "code"
    ] == "avatar_exists"

    assert (await alice.request({"type": "get_avatar"}))["avatar"]["personality"] == "romantic"
    assert await _history(alice) == alice_before
    assert (await alice.request({"type": "chat", "text": "still me"}))["persona"] == "romantic"


async def test_hostile_texts_and_names_are_stored_byte_for_byte(
    connect: ClientFactory, database_url: str
) -> None:
    client = await connect()
    name = "'); DROP TABLE users; --"
    created = await client.request({"type": "create_avatar", "name": name, "personality": "witty"})
    assert created["avatar"]["name"] == name
    sent = []
    for text in HOSTILE:
        text = text.replace("\\x00", "")  # NUL cannot be stored by PostgreSQL: refused below
        reply = await client.request({"type": "chat", "text": text})
        assert reply["type"] == "reply", reply
        sent.append(text)
    stored = [m["text"] for m in await _history(client) if m["role"] == "user"]
    assert stored == sent
    nul = await client.request({"type": "chat", "text": "a\x00b"})
    assert nul["code"] == "invalid_frame"
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM users") > 0
        assert await conn.fetchval("SELECT to_regclass('messages') IS NOT NULL")
    finally:
        await conn.close()
