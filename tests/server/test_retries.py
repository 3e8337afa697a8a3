"""Idempotent retries: a chat resent with the same id is never stored twice."""

from __future__ import annotations

from tests.conftest import AppFactory, ClientFactory, slow_client, with_avatar


async def test_resent_chat_is_answered_from_storage_with_replayed(
    connect: ClientFactory, user: str
) -> None:
    first = await connect(user)
    await with_avatar(first, "witty")
    await first.send({"type": "chat", "id": "retry-1", "text": "did you get this?"})
    original = await first.recv_type("reply")
    second = await connect(user)  # a reconnect
    await second.send({"type": "chat", "id": "retry-1", "text": "did you get this?"})
    replayed = await second.recv_type("reply")
    assert replayed == {**original, "replayed": True}
    history = await second.request({"type": "history"})
    assert [m["text"] for m in history["messages"]] == ["did you get this?", original["text"]]


async def test_resent_chat_after_a_persona_switch_replays_the_old_persona(
    connect: ClientFactory,
) -> None:
    client = await connect()
    await with_avatar(client, "caring")
    await client.send({"type": "chat", "id": "r2", "text": "hello"})
    original = await client.recv_type("reply")
    await client.request({"type": "set_persona", "personality": "playful"})
    await client.send({"type": "chat", "id": "r2", "text": "hello"})
    replayed = await client.recv_type("reply")
    assert (replayed["persona"], replayed["text"], replayed["replayed"]) == (
        "caring", original["text"], True,
    )  # fmt: skip


async def test_same_id_with_other_text_is_duplicate_id(connect: ClientFactory) -> None:
    client = await connect()
    await with_avatar(client)
    await client.send({"type": "chat", "id": "r3", "text": "first text"})
    await client.recv_type("reply")
    await client.send({"type": "chat", "id": "r3", "text": "second text"})
    error = await client.recv_type("error")
    assert (error["ref"], error["code"], error["status"]) == ("r3", "duplicate_id", 409)
    history = await client.request({"type": "history"})
    assert [m["text"] for m in history["messages"] if m["role"] == "user"] == ["first text"]


async def test_same_id_while_still_generating_is_busy(
    make_app: AppFactory, connect: ClientFactory, user: str
) -> None:
    app = await make_app(template_delay_ms=150)
    first = await connect(user, target=app)
    second = await connect(user, target=app)
    await with_avatar(first)
    await first.send({"type": "chat", "id": "r4", "text": "slow one"})
    await first.recv_type("reply_delta")
    await second.send({"type": "chat", "id": "r4", "text": "slow one"})
    error = await second.recv_type("error")
    assert (error["ref"], error["code"], error["status"]) == ("r4", "busy", 409)
    assert (await first.recv_type("reply"))["status"] == "completed"


async def test_streaming_retry_is_replayed_without_generating_again(
    make_app: AppFactory, connect: ClientFactory, user: str
) -> None:
    _, client = await slow_client(make_app, connect, 20, user)
    await client.send({"type": "chat", "id": "r5", "text": "stream once"})
    original = await client.recv_type("reply")
    await client.send({"type": "chat", "id": "r5", "text": "stream once"})
    answer = await client.recv()
    assert answer == {**original, "replayed": True}  # no reply_delta before it


async def test_cancelled_reply_is_replayed_with_its_status(
    make_app: AppFactory, connect: ClientFactory, user: str
) -> None:
    _, client = await slow_client(make_app, connect, 100, user)
    await client.send({"type": "chat", "id": "r6", "text": "stop me"})
    await client.recv_type("reply_delta")
    await client.send({"type": "cancel"})
    cancelled = await client.recv_type("reply")
    await client.send({"type": "chat", "id": "r6", "text": "stop me"})
    replayed = await client.recv_type("reply")
    assert (replayed["status"], replayed["text"], replayed["replayed"]) == (
        "cancelled", cancelled["text"], True,
    )  # fmt: skip


async def test_chats_queued_behind_a_replay_are_answered_in_order(connect: ClientFactory) -> None:
    client = await connect()
    await with_avatar(client)
    await client.send({"type": "chat", "id": "q1", "text": "first"})
    await client.recv_type("reply")
    for ref, text in (("q1", "first"), ("q2", "second"), ("q3", "third")):  # q1 again: a retry
        await client.send({"type": "chat", "id": ref, "text": text})
    answers = [await client.recv_type("reply") for _ in range(3)]
    assert [(a["ref"], a.get("replayed", False)) for a in answers] == [
        ("q1", True), ("q2", False), ("q3", False),
    ]  # fmt: skip
