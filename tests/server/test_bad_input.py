"""Bad and hostile input on a live connection: every rejection answered, nothing crashes."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from tests.client import Client
from tests.conftest import AppFactory, ClientFactory


async def test_non_json_text_is_bad_json(connect: ClientFactory) -> None:
    client = await connect()
    await client.send_raw("hello there")
    answer = await client.recv()
    assert (answer["type"], answer["ref"], answer["code"], answer["status"]) == (
        "error", None, "bad_json", 400,
    )  # fmt: skip


async def test_binary_frame_is_bad_json(connect: ClientFactory) -> None:
    client = await connect()
    await client.send_raw(b'{"type":"ping"}')
    assert (await client.recv())["code"] == "bad_json"


@pytest.mark.parametrize("raw", ["[1, 2]", "42", '"ping"', "null"])
async def test_json_that_is_not_an_object_is_bad_json(connect: ClientFactory, raw: str) -> None:
    client = await connect()
    await client.send_raw(raw)
    assert (await client.recv())["code"] == "bad_json"


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "dance", "id": "r"},
        {"type": "chat", "id": "r"},
        {"type": "chat", "id": "r", "text": "hi", "extra": True},
        {"type": "chat", "id": "r", "text": 12},
        {"type": "chat", "id": "r", "text": ""},
        {"type": "chat", "id": "r", "text": "x" * 4001},
        {"type": "history", "id": "r", "limit": "ten"},
    ],
)
async def test_invalid_frame_is_answered_with_its_ref(
    connect: ClientFactory, frame: dict[str, object]
) -> None:
    client = await connect()
    await client.send(frame)
    answer = await client.recv()
    assert (answer["ref"], answer["code"], answer["status"]) == ("r", "invalid_frame", 422)


async def test_over_long_id_is_invalid_frame_with_null_ref(connect: ClientFactory) -> None:
    client = await connect()
    await client.send({"type": "ping", "id": "i" * 65})
    answer = await client.recv()
    assert (answer["ref"], answer["code"]) == (None, "invalid_frame")


async def test_connection_stays_open_after_errors(connect: ClientFactory) -> None:
    client = await connect()
    for raw in ("nope", "[]", '{"type":"x"}'):
        await client.send_raw(raw)
        assert (await client.recv())["type"] == "error"
    assert (await client.request({"type": "ping"}))["type"] == "pong"


async def test_frame_over_64_kib_closes_1009(connect: ClientFactory) -> None:
    client = await connect()
    await client.send({"type": "chat", "text": "x" * (65 * 1024)})
    with pytest.raises(ConnectionClosed):
        await client.recv()
    assert client.conn.close_code == 1009


async def test_too_many_frames_are_rate_limited(
    make_app: AppFactory, connect: ClientFactory
) -> None:
    app = await make_app(rate_per_s=1, rate_burst=3)
    client = await connect(target=app)
    for index in range(5):
        await client.send({"type": "ping", "id": f"p{index}"})
    answers = [await client.recv() for _ in range(5)]
    assert [a["type"] for a in answers] == ["pong", "pong", "pong", "error", "error"]
    assert (answers[3]["ref"], answers[3]["code"], answers[3]["status"]) == (
        "p3", "rate_limited", 429,
    )  # fmt: skip


async def test_client_that_keeps_abusing_the_rate_limit_is_closed_1008(
    make_app: AppFactory, connect: ClientFactory
) -> None:
    app = await make_app(rate_per_s=1, rate_burst=1, abuse_close_after=5)
    client = await connect(target=app)
    for _ in range(10):
        await client.send({"type": "ping"})
    with pytest.raises(ConnectionClosed):
        for _ in range(20):
            await client.recv()
    assert client.conn.close_code == 1008


_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_frames = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            ["chat", "set_persona", "history", "get_avatar", "ping", "hello", "zz"]
        )
    },
    optional={
        "id": st.text(max_size=70),
        "text": _values,
        "personality": _values,
        "limit": _values,
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=st.one_of(_frames.map(json.dumps), _values.map(json.dumps), st.text(max_size=100)))
async def test_any_frame_gets_exactly_one_answer_and_the_server_lives(
    connect: ClientFactory, payload: str
) -> None:
    client: Client = await connect()
    await client.send_raw(payload)
    await client.send({"type": "ping", "id": "after"})
    answers = []
    while True:
        answer = await client.recv()
        assert answer["type"] in {"error", "pong", "avatar", "persona_set", "personas", "notice",
                                  "history", "reply"}  # fmt: skip
        if answer.get("ref") == "after" and answer["type"] == "pong":
            break
        answers.append(answer)
    assert len(answers) == 1
