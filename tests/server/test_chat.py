"""Chat turns: replies, storage, history, cancel, the queue of waiting chats, isolation."""

from __future__ import annotations

from tests.client import login
from tests.conftest import SECRET, AppFactory, ClientFactory, slow_client, with_avatar


async def test_chat_without_avatar_is_no_avatar(connect: ClientFactory) -> None:
    client = await connect()
    answer = await client.request({"type": "chat", "text": "hello?"})
    assert (answer["code"], answer["status"]) == ("no_avatar", 404)


async def test_two_personas_answer_the_same_text_differently(connect: ClientFactory) -> None:
    texts = []
    for persona in ("friendly", "witty"):
        client = await connect()
        await with_avatar(client, persona)
        texts.append((await client.request({"type": "chat", "text": "I lost my keys"}))["text"])
    assert texts[0] != texts[1]


async def test_completed_reply_is_already_in_history(connect: ClientFactory) -> None:
    client = await connect()
    await with_avatar(client, "caring")
    reply = await client.request({"type": "chat", "text": "rainy day"})
    history = await client.request({"type": "history"})
    assert [(m["id"], m["role"], m["persona"], m["text"]) for m in history["messages"]] == [
        (reply["message_id"], "user", "caring", "rainy day"),
        (reply["reply_id"], "assistant", "caring", reply["text"]),
    ]
    assert all(m["created_at"].endswith("Z") for m in history["messages"])


async def test_double_slash_is_stored_as_text_without_first_slash(connect: ClientFactory) -> None:
    client = await connect()
    await with_avatar(client)
    reply = await client.request({"type": "chat", "text": "//persona is a word"})
    assert reply["type"] == "reply"
    history = await client.request({"type": "history", "limit": 1, "before": reply["reply_id"]})
    assert history["messages"][0]["text"] == "/persona is a word"


async def test_history_pages_backwards_oldest_first(connect: ClientFactory) -> None:
    client = await connect()
    await with_avatar(client)
    for index in range(3):
        await client.request({"type": "chat", "text": f"note {index}"})
    newest = await client.request({"type": "history", "limit": 2})
    assert [m["role"] for m in newest["messages"]] == ["user", "assistant"]
    assert newest["messages"][0]["text"] == "note 2"
    older = await client.request(
        {"type": "history", "limit": 100, "before": newest["messages"][0]["id"]}
    )
    assert [m["text"] for m in older["messages"] if m["role"] == "user"] == ["note 0", "note 1"]
    ids = [m["id"] for m in older["messages"] + newest["messages"]]
    assert ids == sorted(ids)


async def test_history_is_isolated_between_users(connect: ClientFactory) -> None:
    alice = await connect()
    bob = await connect()
    await with_avatar(alice)
    reply = await alice.request({"type": "chat", "text": "alice's secret"})
    assert (await bob.request({"type": "history"}))["messages"] == []
    peek = await bob.request({"type": "history", "before": reply["reply_id"] + 1})
    assert peek["messages"] == []


async def test_ping_answers_pong_with_ref(connect: ClientFactory) -> None:
    client = await connect()
    await client.send({"type": "ping", "id": "p-1"})
    assert await client.recv() == {"type": "pong", "ref": "p-1"}


async def test_frame_without_id_is_answered_with_null_ref(connect: ClientFactory) -> None:
    client = await connect()
    await client.send({"type": "ping"})
    assert await client.recv() == {"type": "pong", "ref": None}


async def test_cancel_without_reply_in_flight_is_nothing_to_cancel(connect: ClientFactory) -> None:
    client = await connect()
    answer = await client.request({"type": "cancel"})
    assert (answer["code"], answer["status"]) == ("nothing_to_cancel", 409)


async def test_cancel_ends_reply_cancelled_with_chat_ref_and_stores_it(
    make_app: AppFactory, connect: ClientFactory
) -> None:
    _, client = await slow_client(make_app, connect, 80)
    await client.send({"type": "chat", "id": "long", "text": "tell me everything"})
    delta = await client.recv_type("reply_delta")
    await client.send({"type": "cancel", "id": "stop"})
    reply = await client.recv_type("reply")
    assert (reply["ref"], reply["status"], reply["reply_id"]) == (
        "long", "cancelled", delta["reply_id"],
    )  # fmt: skip
    assert reply["text"].startswith(delta["delta"])
    history = await client.request({"type": "history"})
    assert [(m["role"], m["text"]) for m in history["messages"]] == [
        ("user", "tell me everything"),
        ("assistant", reply["text"]),
    ]


async def test_deltas_join_into_a_prefix_of_the_reply(
    make_app: AppFactory, connect: ClientFactory
) -> None:
    _, client = await slow_client(make_app, connect, 30)
    await client.send({"type": "chat", "id": "m", "text": "stream please"})
    deltas: list[str] = []
    while True:
        frame = await client.recv()
        if frame["type"] == "reply_delta":
            assert frame["ref"] == "m"
            deltas.append(frame["delta"])
        elif frame["type"] == "reply":
            break
    assert len(deltas) >= 2
    assert frame["text"].startswith("".join(deltas))


async def test_ninth_waiting_chat_is_busy(make_app: AppFactory, connect: ClientFactory) -> None:
    _, client = await slow_client(make_app, connect, 200)
    for index in range(10):
        await client.send({"type": "chat", "id": f"q{index}", "text": f"chat {index}"})
    busy = await client.recv_type("error")
    assert (busy["ref"], busy["code"], busy["status"]) == ("q9", "busy", 409)
    await client.send({"type": "cancel"})
    first = await client.recv_type("reply")
    assert (first["ref"], first["status"]) == ("q0", "cancelled")


async def test_waiting_chats_are_answered_in_order(
    make_app: AppFactory, connect: ClientFactory
) -> None:
    _, client = await slow_client(make_app, connect, 5)
    for index in range(8):
        await client.send({"type": "chat", "id": f"q{index}", "text": f"chat {index}"})
    refs = [(await client.recv_type("reply"))["ref"] for _ in range(8)]
    assert refs == [f"q{i}" for i in range(8)]


async def test_conversation_survives_a_server_restart(make_app: AppFactory, user: str) -> None:
    first = await make_app()
    client = await login(first.url, SECRET, user)
    await with_avatar(client, "professional")
    reply = await client.request({"type": "chat", "text": "remember this"})
    await client.__aexit__(None, None, None)
    await first.stop()
    second = await make_app()
    again = await login(second.url, SECRET, user)
    assert again.welcome["avatar"]["personality"] == "professional"
    history = await again.request({"type": "history"})
    assert [m["id"] for m in history["messages"]] == [reply["message_id"], reply["reply_id"]]
    await again.__aexit__(None, None, None)


async def test_reply_recalls_the_previous_message(connect: ClientFactory) -> None:
    client = await connect()
    await with_avatar(client, "friendly")
    await client.request({"type": "chat", "text": "my cat is called Miso"})
    reply = await client.request({"type": "chat", "text": "what's new"})
    assert "my cat is called Miso" in reply["text"]
