"""How a reply ended is stored with it: completed, cancelled, interrupted or failed (with the
error code), and history pages carry it, so that a client can mark it after a reload."""

from __future__ import annotations

from tests.conftest import AppFactory, ClientFactory, slow_client, with_avatar


async def test_a_reply_the_llm_could_not_give_is_stored_failed_with_its_error(
    make_app: AppFactory, connect: ClientFactory, refused_url: str
) -> None:
    app = await make_app(generator="openai", llm_base_url=refused_url)
    client = await connect(target=app)
    await with_avatar(client)
    answer = await client.request({"type": "chat", "text": "are you there?"})
    assert (answer["type"], answer["code"]) == ("error", "unavailable")
    page = await client.request({"type": "history"})
    asked, reply = page["messages"]
    assert (asked["status"], "error" in asked) == ("completed", False)
    assert (reply["role"], reply["status"], reply["error"], reply["text"]) == (
        "assistant", "failed", "unavailable", "",
    )  # fmt: skip


async def test_completed_and_cancelled_replies_say_so_in_history(
    make_app: AppFactory, connect: ClientFactory
) -> None:
    _, client = await slow_client(make_app, connect, delay_ms=50)
    done = await client.request({"type": "chat", "text": "a quick one"})
    assert done["status"] == "completed"
    await client.send({"type": "chat", "id": "long", "text": "tell me a long story"})
    await client.recv_type("reply_delta")
    await client.send({"type": "cancel"})
    cancelled = await client.recv_type("reply")
    assert cancelled["status"] == "cancelled"
    statuses = [m["status"] for m in (await client.request({"type": "history"}))["messages"]]
    assert statuses == ["completed", "completed", "completed", "cancelled"]


async def test_a_reply_cut_off_by_the_connection_is_stored_interrupted(
    make_app: AppFactory, connect: ClientFactory, user: str
) -> None:
    app, client = await slow_client(make_app, connect, delay_ms=50, user=user)
    await client.send({"type": "chat", "id": "cut", "text": "tell me a long story"})
    await client.recv_type("reply_delta")
    await client.conn.close()
    again = await connect(user, target=app)
    replayed = await again.request({"type": "chat", "id": "cut", "text": "tell me a long story"})
    assert (replayed["replayed"], replayed["status"]) == (True, "interrupted")
    last = (await again.request({"type": "history"}))["messages"][-1]
    assert (last["status"], "error" in last) == ("interrupted", False)
