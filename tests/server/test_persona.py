"""Avatars and persona switches: frames, commands, caching, and pushes to other connections."""

from __future__ import annotations

import asyncio
import uuid

from server.app import App
from tests.client import login
from tests.conftest import SECRET, AppFactory, ClientFactory, with_avatar
from tests.personas import add_personas, get_card, minimal_card, remove_personas

ALLOWED = ["friendly", "playful", "caring", "witty", "professional", "romantic"]


async def test_create_avatar_answers_with_the_stored_avatar(connect: ClientFactory) -> None:
    client = await connect()
    answer = await client.request({"type": "create_avatar", "name": "Ava", "personality": "caring"})
    avatar = answer["avatar"]
    assert (answer["type"], avatar["name"], avatar["personality"]) == ("avatar", "Ava", "caring")
    assert isinstance(avatar["id"], int)
    assert avatar["created_at"].endswith("Z") and avatar["updated_at"].endswith("Z")


async def test_create_avatar_answers_with_the_cards_greeting(
    app: App, connect: ClientFactory, database_url: str
) -> None:
    client = await connect()
    answer = await client.request({"type": "create_avatar", "name": "Ava", "personality": "caring"})
    assert answer["greeting"] == get_card("caring").greeting
    card = minimal_card("Wren")
    card["data"] = {**card["data"], "first_mes": "  Hi {{user}}, I am {{char}}. <USER>?  "}  # type: ignore[dict-item]
    added = await add_personas(database_url, 1, f"g{uuid.uuid4().hex[:6]}", [card])
    added += await add_personas(database_url, 1, f"m{uuid.uuid4().hex[:6]}", [minimal_card("Mute")])
    wren, mute = added  # Mute has no first_mes: no greeting
    try:
        async with asyncio.timeout(5):  # the notifications reach the server's catalogue
            while any(app.services.catalogue.catalogue.get(p) is None for p in added):
                await asyncio.sleep(0.01)
        other = await connect()
        answer = await other.request({"type": "create_avatar", "name": "Ava", "personality": wren})
        user = other.welcome["user_id"]
        assert answer["greeting"] == f"Hi {user}, I am Ava. {user}?"
        nobody = await connect()
        answer = await nobody.request({"type": "create_avatar", "name": "Ava", "personality": mute})
        assert answer["type"] == "avatar" and "greeting" not in answer
        again = await nobody.request({"type": "get_avatar"})
        assert "greeting" not in again  # only the answer to create_avatar has one
    finally:
        await remove_personas(database_url, added)


async def test_second_create_avatar_is_avatar_exists(connect: ClientFactory) -> None:
    client = await connect()
    await with_avatar(client)
    answer = await client.request({"type": "create_avatar", "name": "B", "personality": "witty"})
    assert (answer["type"], answer["code"], answer["status"]) == ("error", "avatar_exists", 409)


async def test_create_avatar_with_unknown_persona_lists_allowed(connect: ClientFactory) -> None:
    client = await connect()
    answer = await client.request({"type": "create_avatar", "name": "B", "personality": "grumpy"})
    assert (answer["code"], answer["status"]) == ("invalid_persona", 422)
    assert answer["details"] == {"allowed": ALLOWED}


async def test_get_avatar_without_one_is_no_avatar(connect: ClientFactory) -> None:
    client = await connect()
    answer = await client.request({"type": "get_avatar"})
    assert (answer["code"], answer["status"]) == ("no_avatar", 404)


async def test_get_avatar_returns_the_current_personality(connect: ClientFactory) -> None:
    client = await connect()
    await with_avatar(client, "friendly")
    await client.request({"type": "set_persona", "personality": "romantic"})
    answer = await client.request({"type": "get_avatar"})
    assert answer["avatar"]["personality"] == "romantic"


async def test_set_persona_answers_personality_and_previous(connect: ClientFactory) -> None:
    client = await connect()
    await with_avatar(client, "friendly")
    answer = await client.request({"type": "set_persona", "personality": "playful"})
    assert (answer["type"], answer["personality"], answer["previous"]) == (
        "persona_set", "playful", "friendly",
    )  # fmt: skip


async def test_set_persona_unknown_is_invalid_persona(connect: ClientFactory) -> None:
    client = await connect()
    await with_avatar(client)
    answer = await client.request({"type": "set_persona", "personality": "Playful"})
    assert (answer["code"], answer["details"]) == ("invalid_persona", {"allowed": ALLOWED})


async def test_set_persona_without_avatar_is_no_avatar(connect: ClientFactory) -> None:
    client = await connect()
    answer = await client.request({"type": "set_persona", "personality": "witty"})
    assert (answer["code"], answer["status"]) == ("no_avatar", 404)


async def test_a_chat_behind_a_switch_without_avatar_is_no_avatar_too(
    app: App, connect: ClientFactory
) -> None:
    user = f"no-avatar-{uuid.uuid4().hex[:8]}"
    client = await connect(user)
    await client.send({"type": "set_persona", "id": "s1", "personality": "witty"})
    await client.send({"type": "chat", "id": "m1", "text": "right behind the switch"})
    first, second = await client.recv(), await client.recv()
    assert [(f["ref"], f["code"]) for f in (first, second)] == [
        ("s1", "no_avatar"), ("m1", "no_avatar"),
    ]  # fmt: skip
    assert await app.services.store.history(user, 10, None) == []


async def test_an_avatar_created_behind_a_failed_switch_is_not_switched(
    connect: ClientFactory,
) -> None:
    client = await connect()
    await client.send({"type": "set_persona", "id": "s1", "personality": "witty"})
    await client.send({"type": "create_avatar", "id": "c1", "name": "Ava", "personality": "caring"})
    first, second = await client.recv(), await client.recv()
    assert (first["ref"], first["code"]) == ("s1", "no_avatar")
    assert (second["ref"], second["avatar"]["personality"]) == ("c1", "caring")
    await client.send({"type": "chat", "id": "m1", "text": "who are you now?"})
    assert (await client.recv_type("reply"))["persona"] == "caring"


async def test_the_switch_is_acknowledged_before_the_reply_rendered_behind_it(
    connect: ClientFactory,
) -> None:
    client = await connect()
    await with_avatar(client, "friendly")
    await client.send({"type": "chat", "id": "s1", "text": "/persona caring"})
    await client.send({"type": "chat", "id": "m1", "text": "right behind the switch"})
    first, second = await client.recv(), await client.recv()
    assert (first["type"], first["ref"], first["previous"]) == ("persona_set", "s1", "friendly")
    assert (second["type"], second["ref"], second["persona"]) == ("reply", "m1", "caring")


async def test_persona_command_answers_like_set_persona(connect: ClientFactory) -> None:
    client = await connect()
    await with_avatar(client, "friendly")
    answer = await client.request({"type": "chat", "text": "/persona caring"})
    assert (answer["type"], answer["personality"], answer["previous"]) == (
        "persona_set", "caring", "friendly",
    )  # fmt: skip


async def test_persona_command_without_name_is_invalid_persona(connect: ClientFactory) -> None:
    client = await connect()
    await with_avatar(client)
    answer = await client.request({"type": "chat", "text": "/persona"})
    assert (answer["code"], answer["details"]) == ("invalid_persona", {"allowed": ALLOWED})


async def test_persona_command_with_unknown_name_is_invalid_persona(connect: ClientFactory) -> None:
    client = await connect()
    await with_avatar(client)
    answer = await client.request({"type": "chat", "text": "/persona grumpy"})
    assert (answer["code"], answer["status"]) == ("invalid_persona", 422)


async def test_personas_command_lists_the_catalogue(connect: ClientFactory) -> None:
    client = await connect()
    answer = await client.request({"type": "chat", "text": "/personas"})
    assert answer["type"] == "personas"
    assert [p["id"] for p in answer["personas"]] == ALLOWED
    assert all(p["name"] and p["description"] for p in answer["personas"])


async def test_help_command_answers_notice(connect: ClientFactory) -> None:
    client = await connect()
    answer = await client.request({"type": "chat", "text": "/help"})
    assert answer["type"] == "notice" and "/persona NAME" in answer["text"]


async def test_unknown_command_is_unknown_command(connect: ClientFactory) -> None:
    client = await connect()
    answer = await client.request({"type": "chat", "text": "/dance"})
    assert (answer["code"], answer["status"]) == ("unknown_command", 422)


async def test_commands_are_not_stored_as_messages(connect: ClientFactory) -> None:
    client = await connect()
    await with_avatar(client)
    for text in ("/persona witty", "/personas", "/help", "/dance"):
        await client.request({"type": "chat", "text": text})
    answer = await client.request({"type": "history"})
    assert answer["messages"] == []


async def test_switch_on_one_connection_pushes_persona_changed_to_the_other(
    connect: ClientFactory, user: str
) -> None:
    first = await connect(user)
    second = await connect(user)
    await with_avatar(first, "friendly")
    await first.request({"type": "set_persona", "personality": "witty"})
    pushed = await second.recv()
    assert pushed == {"type": "persona_changed", "personality": "witty", "previous": "friendly"}
    reply = await second.request({"type": "chat", "text": "and now?"})
    assert reply["persona"] == "witty"


async def test_other_connection_does_not_get_its_own_switch_pushed(
    connect: ClientFactory, user: str
) -> None:
    first = await connect(user)
    await with_avatar(first, "friendly")
    await first.request({"type": "set_persona", "personality": "witty"})
    pong = await first.request({"type": "ping"})
    assert pong["type"] == "pong"


async def test_cached_avatar_of_other_connection_is_replaced_after_switch(
    connect: ClientFactory, user: str
) -> None:
    first = await connect(user)
    second = await connect(user)
    await with_avatar(first, "friendly")
    assert (await second.request({"type": "chat", "text": "hi"}))["persona"] == "friendly"
    await first.request({"type": "set_persona", "personality": "caring"})
    assert (await second.request({"type": "chat", "text": "hi again"}))["persona"] == "caring"


async def test_avatar_created_elsewhere_is_visible_on_the_next_frame(
    connect: ClientFactory, user: str
) -> None:
    first = await connect(user)
    second = await connect(user)
    assert (await second.request({"type": "get_avatar"}))["code"] == "no_avatar"
    await with_avatar(first, "playful")
    assert (await second.request({"type": "get_avatar"}))["avatar"]["personality"] == "playful"


async def test_welcome_carries_the_existing_avatar(
    app: App, connect: ClientFactory, user: str
) -> None:
    first = await connect(user)
    await with_avatar(first, "witty")
    second = await connect(user)
    assert second.welcome["avatar"]["personality"] == "witty"


async def test_many_pipelined_switches_and_chats_keep_order(connect: ClientFactory) -> None:
    client = await connect()
    await with_avatar(client, "friendly")
    order = ["playful", "caring", "witty", "professional", "romantic", "friendly"]
    for index, persona in enumerate(order):
        await client.send({"type": "set_persona", "id": f"s{index}", "personality": persona})
        await client.send({"type": "chat", "id": f"m{index}", "text": f"message {index}"})
    replies: dict[str, str] = {}
    while len(replies) < len(order):
        frame = await client.recv()
        if frame["type"] == "reply":
            replies[frame["ref"]] = frame["persona"]
    assert replies == {f"m{i}": persona for i, persona in enumerate(order)}


async def test_the_chat_after_a_switch_renders_from_the_committed_row(
    connect: ClientFactory,
) -> None:
    """That it reads no row again is a rule of the conversation, tested there."""
    client = await connect()
    await with_avatar(client, "friendly")
    ack = await client.request({"type": "set_persona", "personality": "romantic"})
    assert ack["type"] == "persona_set"  # answered: the chat reads the cache, not the switch
    await client.send({"type": "chat", "id": "m1", "text": "after the acknowledgement"})
    reply = await client.recv_type("reply")
    assert reply["persona"] == "romantic"


async def test_reply_in_flight_keeps_its_persona_across_a_switch(make_app: AppFactory) -> None:
    slow = await make_app(template_delay_ms=60)
    client = await login(slow.url, SECRET, f"inflight-{uuid.uuid4().hex[:8]}")
    try:
        await with_avatar(client, "friendly")
        await client.send({"type": "chat", "id": "m1", "text": "tell me a long story"})
        await client.recv_type("reply_delta")
        switched = await client.request({"type": "set_persona", "personality": "witty"})
        assert switched["type"] == "persona_set"
        await client.send({"type": "chat", "id": "m2", "text": "and another"})
        first = await client.recv_type("reply")
        second = await client.recv_type("reply")
    finally:
        await client.__aexit__(None, None, None)
    assert (first["ref"], first["persona"], first["status"]) == ("m1", "friendly", "completed")
    assert (second["ref"], second["persona"]) == ("m2", "witty")
