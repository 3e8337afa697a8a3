"""The frame decoder and encoder: every accepted shape and every rejection, without I/O."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import BadJson, InvalidFrame, InvalidPersona
from protocol.frames import (
    Chat,
    ChatFields,
    Error,
    History,
    HistoryEntry,
    Limits,
    PersonaInfo,
    Personas,
    Reply,
    ReplyDelta,
    ReplyStatus,
    SetPersona,
    SetPersonaFields,
    Usage,
    Welcome,
    close_reason,
    decode_client_frame,
    decode_hot_frame,
    decode_server_frame,
    encode,
    encode_listing,
    encode_reply,
    encode_reply_delta,
    error_frame,
    fit_history_page,
    salvage_ref,
)
from tests.personas import BUILTIN_IDS


def test_chat_frame_decodes_with_its_id() -> None:
    frame = decode_client_frame('{"type":"chat","id":"m1","text":"hi"}')
    assert frame == Chat(type="chat", id="m1", text="hi")


def test_history_defaults_to_fifty_and_no_cursor() -> None:
    frame = decode_client_frame('{"type":"history"}')
    assert isinstance(frame, History)
    assert (frame.limit, frame.before) == (50, None)


@pytest.mark.parametrize("raw", ["{bad", "[1]", "1", '"chat"', "null", ""])
def test_text_that_is_not_a_json_object_is_bad_json(raw: str) -> None:
    with pytest.raises(BadJson):
        decode_client_frame(raw)


def test_a_frame_with_many_fields_is_refused_before_the_model() -> None:
    """The model builds an error for every unknown field: 6,000 cost 21 ms of the process's
    loop (an attack kept the loop 700 ms late under the rate limit with them)."""
    raw = json.dumps({"type": "history", **{f"k{i}": [1] for i in range(6000)}})
    with pytest.raises(InvalidFrame, match="a frame has at most 8 fields"):
        decode_client_frame(raw)
    with pytest.raises(InvalidFrame, match="Extra inputs"):  # a few unknown fields: as before
        decode_client_frame('{"type":"ping","a":1,"b":2}')


def test_binary_frame_is_bad_json() -> None:
    with pytest.raises(BadJson):
        decode_client_frame(b'{"type":"ping"}')


@pytest.mark.parametrize(
    "raw",
    [
        "{}",
        '{"type":"dance"}',
        '{"type":5}',
        '{"type":"chat"}',
        '{"type":"chat","text":""}',
        '{"type":"chat","text":"' + "x" * 4001 + '"}',
        '{"type":"chat","text":"hi","mood":"sunny"}',
        '{"type":"chat","text":5}',
        '{"type":"chat","text":"a\\u0000b"}',
        '{"type":"ping","id":""}',
        '{"type":"ping","id":"' + "i" * 65 + '"}',
        '{"type":"ping","id":7}',
        '{"type":"history","limit":0}',
        '{"type":"history","limit":101}',
        '{"type":"history","limit":"5"}',
        '{"type":"history","limit":5.5}',
        '{"type":"history","before":0}',
        '{"type":"history","before":99999999999999999999999}',
        '{"type":"create_avatar","name":"","personality":"witty"}',
        '{"type":"create_avatar","name":"' + "n" * 65 + '","personality":"witty"}',
        '{"type":"set_persona"}',
        '{"type":"hello","token":""}',
    ],
)
def test_object_that_is_not_a_valid_frame_is_invalid_frame(raw: str) -> None:
    with pytest.raises(InvalidFrame):
        decode_client_frame(raw)


def test_text_of_exactly_4000_chars_is_accepted() -> None:
    frame = decode_client_frame(orjson.dumps({"type": "chat", "text": "é" * 4000}).decode())
    assert isinstance(frame, Chat) and len(frame.text) == 4000


def test_unknown_personality_is_left_to_the_catalogue_check() -> None:
    frame = decode_client_frame('{"type":"set_persona","personality":"grumpy"}')
    assert frame == SetPersona(type="set_persona", personality="grumpy")


@pytest.mark.parametrize(
    ("raw", "ref"),
    [
        ('{"type":"dance","id":"x1"}', "x1"),
        ('{"type":"chat","id":"x2"}', "x2"),
        ('{"type":"chat","id":""}', None),
        ('{"type":"chat","id":5}', None),
        ("[1]", None),
        ("{bad", None),
        (b"bytes", None),
        ('{"type":"chat","id":"x3","text":"\\ud800"}', "x3"),  # a lone surrogate elsewhere
        ('{"type":"history","id":"x4","limit":NaN}', "x4"),  # not JSON, but readable
        ('{"type":"chat","id":"\\ud800"}', None),
    ],
)
def test_salvage_ref_keeps_only_a_valid_id(raw: str | bytes, ref: str | None) -> None:
    assert salvage_ref(raw) == ref


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("short", "short"),
        ("é" * 61, "é" * 61),  # 122 bytes: fits
        ("é" * 62, "é" * 60 + "..."),  # cut on a character boundary, within 123 bytes
    ],
)
def test_close_reason_fits_a_close_frame(text: str, reason: str) -> None:
    assert close_reason(text) == reason
    assert len(close_reason(text).encode()) <= 123


def test_encode_leaves_out_unset_optional_fields_but_keeps_null_ref() -> None:
    reply = Reply(
        ref=None, reply_id=2, message_id=1, persona="witty", text="hi", status="completed"
    )
    assert orjson.loads(encode(reply)) == {
        "type": "reply",
        "ref": None,
        "reply_id": 2,
        "message_id": 1,
        "persona": "witty",
        "text": "hi",
        "status": "completed",
    }


def test_encode_includes_usage_when_known() -> None:
    reply = Reply(
        ref="m", reply_id=2, message_id=1, persona="witty", text="hi", status="completed",
        usage=Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7),
    )  # fmt: skip
    assert orjson.loads(encode(reply))["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
    }  # fmt: skip


@settings(max_examples=300)
@given(
    ref=st.one_of(st.none(), st.text(max_size=64)),
    ids=st.tuples(st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1)),
    persona=st.sampled_from(BUILTIN_IDS),
    text=st.text(st.characters(exclude_categories=["Cs"]), max_size=300),
    status=st.sampled_from(["completed", "cancelled", "failed"]),
)
def test_the_fast_reply_encoder_writes_what_the_model_encoder_writes(
    ref: str | None, ids: tuple[int, int], persona: str, text: str, status: ReplyStatus
) -> None:
    reply = Reply(
        ref=ref, reply_id=ids[0], message_id=ids[1], persona=persona, text=text, status=status
    )
    assert encode_reply(ref, ids[0], ids[1], persona, text, status) == encode(reply)


@settings(max_examples=300)
@given(
    ref=st.one_of(st.none(), st.text(max_size=64)),
    reply_id=st.integers(0, 2**63 - 1),
    delta=st.text(st.characters(exclude_categories=["Cs"]), max_size=100),
)
def test_the_fast_delta_encoder_writes_what_the_model_encoder_writes(
    ref: str | None, reply_id: int, delta: str
) -> None:
    frame = ReplyDelta(ref=ref, reply_id=reply_id, delta=delta)
    assert encode_reply_delta(ref, reply_id, delta) == encode(frame)


def test_error_frame_carries_code_status_and_details() -> None:
    frame = error_frame(InvalidPersona("nope", details={"allowed": ["witty"]}), "r1")
    assert frame == Error(
        ref="r1", code="invalid_persona", status=422, message="nope", details={"allowed": ["witty"]}
    )


def test_unexpected_exception_becomes_internal_error_frame() -> None:
    frame = error_frame(RuntimeError("secret detail"), None)
    assert (frame.code, frame.status, frame.ref) == ("internal", 500, None)
    assert "secret detail" not in frame.message


def test_server_frames_round_trip_through_the_server_decoder() -> None:
    reply = Reply(ref="m", reply_id=2, message_id=1, persona="caring", text="x", status="failed")
    assert decode_server_frame(encode(reply)) == reply


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
_frame_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["hello", "chat", "set_persona", "history", "ping", "cancel", "x"])},
    optional={
        "id": st.text(max_size=70) | st.integers(),
        "text": st.text(max_size=50) | st.integers(),
        "personality": st.text(max_size=20),
        "limit": st.integers() | st.text(max_size=3),
        "before": st.integers() | st.none(),
        "token": st.text(max_size=20),
    },
)


@settings(max_examples=300)
@given(st.one_of(_json, _frame_like))
def test_any_json_value_decodes_or_is_rejected_cleanly(value: object) -> None:
    raw = json.dumps(value)
    try:
        decode_client_frame(raw)
    except (BadJson, InvalidFrame):
        ref = salvage_ref(raw)
        assert ref is None or 1 <= len(ref) <= 64


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_any_text_decodes_or_is_rejected_cleanly(raw: str) -> None:
    try:
        decode_client_frame(raw)
    except (BadJson, InvalidFrame):
        assert salvage_ref(raw) is None or raw.lstrip().startswith("{")


_hot_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["chat", "set_persona", "chat ", "ping", 1])},
    optional={
        "id": st.none() | st.text(max_size=70) | st.integers() | st.booleans(),
        "text": st.text(max_size=20) | st.integers(3998, 4001).map(lambda n: "y" * n) | st.none(),
        "personality": st.text(max_size=70) | st.integers(),
        "extra": st.none(),
    },
)
_edge_chars = st.sampled_from(
    ["\x00", "\ud800", "\\u0000", "\\ud83d", '"', " ", "\u00e9", "\U0001f600"]
)


@settings(max_examples=1000)
@given(_hot_like, st.lists(_edge_chars, max_size=3), st.booleans(), st.data())
def test_the_fast_decoder_reads_hot_frames_as_the_models_do(
    value: dict[str, object], edges: list[str], duplicate: bool, data: st.DataObject
) -> None:
    for edge in edges:  # NULs, lone surrogates and escapes inside the strings
        key = data.draw(st.sampled_from(sorted(value)))
        if isinstance(value[key], str):
            value[key] = str(value[key]) + edge
    raw = json.dumps(value, ensure_ascii=data.draw(st.booleans()))
    if duplicate:  # a key given twice: the last one counts, in both
        raw = raw[:-1] + ', "text": "again"}' if len(raw) > 2 else raw
    hot = decode_hot_frame(raw)
    try:
        frame = decode_client_frame(raw)
    except (BadJson, InvalidFrame):
        assert hot is None, raw
        return
    if hot is not None:  # None is always allowed: the model then decodes it
        assert hot._asdict() == frame.model_dump(), raw


def test_the_fast_decoder_takes_the_usual_frames() -> None:
    chat = decode_hot_frame('{"type":"chat","id":"c-1","text":"hi there"}')
    switch = decode_hot_frame('{"type": "set_persona", "personality": "witty"}')
    assert chat == ChatFields("c-1", "hi there")
    assert switch == SetPersonaFields(None, "witty")
    for other in ('{"type":"ping"}', '{"type":"chat","text":""}', b'{"type":"chat"}', "[1]"):
        assert decode_hot_frame(other) is None


def _entry(index: int, text: str) -> HistoryEntry:
    return HistoryEntry(
        id=index, role="user", persona="witty", text=text, created_at=datetime.now(UTC)
    )


def test_history_page_keeps_the_newest_entries_that_fit() -> None:
    entries = [_entry(i, "\u0001" * 4000) for i in range(100)]  # about 24 KB of JSON each
    page = fit_history_page(entries)
    assert 0 < len(page) < 100 and page[-1].id == 99
    assert sum(len(orjson.dumps(e.text)) for e in page) <= 512 * 1024


def test_history_page_that_fits_is_unchanged() -> None:
    entries = [_entry(i, "hello") for i in range(100)]
    assert fit_history_page(entries) == entries


def test_errors_are_grouped_by_origin_with_their_status() -> None:
    from protocol.errors import ERROR_CLASSES, ClientError, ServiceError

    for error in ERROR_CLASSES:
        if issubclass(error, ClientError):
            assert 400 <= error.status < 500, error
        else:
            assert issubclass(error, ServiceError) and 500 <= error.status < 600, error


NASTY = st.text(st.characters(exclude_categories=["Cs"]), max_size=40) | st.sampled_from(
    ['"personas":[]', '","personas":[]', "\\", '"'],
)


@settings(max_examples=200)
@given(
    ref=st.one_of(st.none(), NASTY),
    user=NASTY,
    listed=st.lists(st.tuples(NASTY, NASTY, NASTY), max_size=30),
)
def test_a_listing_spliced_into_a_frame_is_what_the_model_encoder_writes(
    ref: str | None, user: str, listed: list[tuple[str, str, str]]
) -> None:
    personas = [PersonaInfo(id=i, name=n, description=d) for i, n, d in listed]
    listing = orjson.dumps([p.model_dump() for p in personas])
    limits = Limits(max_frame_bytes=1, max_text_chars=1, rate_per_s=1.0, rate_burst=1)

    def welcome(with_personas: list[PersonaInfo]) -> Welcome:
        return Welcome(
            ref=ref, session_id=user, user_id=user, avatar=None, personas=with_personas,
            server=user, limits=limits,
        )  # fmt: skip

    assert encode_listing(welcome([]), listing) == encode(welcome(personas))
    frame = Personas(ref=ref, personas=[])
    assert encode_listing(frame, listing) == encode(Personas(ref=ref, personas=personas))
    if personas:
        with pytest.raises(ValueError, match="empty"):
            encode_listing(welcome(personas), listing)
