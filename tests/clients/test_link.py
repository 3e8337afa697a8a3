"""clients.link: lenient decoding, and answers matched by ref over a real WebSocket."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.server import ServerConnection, serve

from clients.link import BadFrame, Frame, Link, LinkClosed, Router, answers, decode
from protocol.frames import PersonaChanged, Reply, Welcome

WELCOME: dict[str, Any] = {
    "type": "welcome",
    "ref": "c1",
    "session_id": "s-1",
    "user_id": "alice",
    "avatar": {
        "id": 1,
        "name": "Ava",
        "personality": "witty",
        "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z",
    },
    "personas": [{"id": "witty", "name": "Witty", "description": "quick"}],
    "protocol": 1,
    "server": "0.1.0",
    "limits": {
        "max_frame_bytes": 65536,
        "max_text_chars": 4000,
        "rate_per_s": 20.0,
        "rate_burst": 40,
    },
}
REPLY: dict[str, Any] = {
    "type": "reply",
    "ref": "m1",
    "reply_id": 2,
    "message_id": 1,
    "persona": "witty",
    "text": "Well, well.",
    "status": "completed",
}


def test_decode_ignores_fields_added_by_a_newer_server_at_any_depth() -> None:
    newer = {**WELCOME, "region": "eu", "avatar": {**WELCOME["avatar"], "mood": "sunny"}}
    newer["limits"] = {**WELCOME["limits"], "max_history": 50}
    frame = decode(orjson.dumps(newer))
    assert isinstance(frame, Welcome)
    assert frame == decode(orjson.dumps(WELCOME))
    assert frame.avatar is not None and frame.avatar.personality == "witty"


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@given(st.dictionaries(st.text(min_size=1, max_size=12), json_values, max_size=5))
def test_decode_of_a_reply_with_any_added_fields_equals_the_plain_reply(
    added: dict[str, Any],
) -> None:
    frame = decode(json.dumps({**added, **REPLY}))
    assert isinstance(frame, Reply)
    assert (frame.ref, frame.persona, frame.text) == ("m1", "witty", "Well, well.")


def test_decode_of_a_frame_type_this_client_does_not_know_is_none() -> None:
    assert decode(orjson.dumps({"type": "typing", "ref": None})) is None
    assert decode(b"not json") is None


def test_answers_matches_the_final_answer_to_a_ref_and_not_its_deltas() -> None:
    assert answers(REPLY, "m1")
    assert not answers(REPLY, "m2")
    assert not answers({"type": "reply_delta", "ref": "m1", "reply_id": 2, "delta": "W"}, "m1")
    assert not answers({"type": "persona_changed", "personality": "witty"}, "m1")


# ---------------------------------------------------------------- over a real WebSocket

Script = Callable[[ServerConnection, dict[str, Any]], Awaitable[None]]
ServerFactory = Callable[[Script], Awaitable[str]]


@pytest.fixture
async def script_server() -> AsyncIterator[ServerFactory]:
    """A real WebSocket server on port 0 that answers each frame with `script`."""
    servers: list[Any] = []

    async def start(script: Script) -> str:
        async def handle(ws: ServerConnection) -> None:
            async for raw in ws:
                await script(ws, orjson.loads(raw))

        server = await serve(handle, "127.0.0.1", 0, compression=None)
        servers.append(server)
        return f"ws://127.0.0.1:{next(iter(server.sockets)).getsockname()[1]}/ws"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def send(ws: ServerConnection, frame: dict[str, Any]) -> None:
    await ws.send(orjson.dumps(frame).decode())


async def test_request_returns_the_answer_to_its_ref_and_hands_on_the_rest(
    script_server: ServerFactory,
) -> None:
    async def script(ws: ServerConnection, frame: dict[str, Any]) -> None:
        ref = frame["id"]
        await send(ws, {"type": "persona_changed", "personality": "caring", "previous": "witty"})
        await send(ws, {"type": "pong", "ref": "someone-else"})
        await send(ws, {"type": "reply_delta", "ref": ref, "reply_id": 2, "delta": "We"})
        await send(ws, {**REPLY, "ref": ref, "added_by_a_newer_server": True})

    others: list[Frame] = []
    async with await Link.open(await script_server(script)) as link:
        answer = await link.request({"type": "chat", "text": "hi"}, 5.0, others.append)
    assert (answer["type"], answer["ref"], answer["text"]) == ("reply", "c1", "Well, well.")
    assert [f["type"] for f in others] == ["persona_changed", "pong", "reply_delta"]


async def test_recv_of_a_frame_that_is_not_a_json_object_raises_bad_frame(
    script_server: ServerFactory,
) -> None:
    async def script(ws: ServerConnection, frame: dict[str, Any]) -> None:
        await ws.send("[1, 2]")
        await ws.send("{oops")

    async with await Link.open(await script_server(script)) as link:
        await link.send({"type": "ping"})
        kinds = []
        for _ in range(2):
            with pytest.raises(BadFrame) as caught:
                await link.recv(5.0)
            kinds.append(caught.value.kind)
    assert kinds == ["not_an_object", "not_json"]


async def test_router_answers_a_request_from_a_newer_server_and_skips_unknown_pushes(
    script_server: ServerFactory,
) -> None:
    async def script(ws: ServerConnection, frame: dict[str, Any]) -> None:
        await send(ws, {"type": "typing", "ref": None})  # a frame type from a newer protocol
        await send(ws, {"type": "persona_changed", "personality": "caring", "previous": "witty"})
        await send(ws, {**WELCOME, "ref": frame["id"], "region": "eu"})

    pushed: list[Any] = []
    router = Router(await Link.open(await script_server(script)))
    router.on_push = pushed.append
    try:
        welcome = await router.request({"type": "hello", "token": "t"})
    finally:
        await router.close()
    assert isinstance(welcome, Welcome) and welcome.user_id == "alice"
    assert pushed == [PersonaChanged(personality="caring", previous="witty")]


async def test_router_request_fails_with_the_close_code_and_reason(
    script_server: ServerFactory,
) -> None:
    async def script(ws: ServerConnection, frame: dict[str, Any]) -> None:
        await ws.close(4401, "bad token signature")

    router = Router(await Link.open(await script_server(script)))
    with pytest.raises(LinkClosed) as caught:
        await router.request({"type": "hello", "token": "t"})
    await router.close()
    assert (caught.value.code, caught.value.reason) == (4401, "bad token signature")
