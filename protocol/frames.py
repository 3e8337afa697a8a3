"""Every frame of the wire protocol as a small frozen pydantic model; one decoder per direction."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal, NamedTuple

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
)

from protocol.errors import BadJson, Internal, InvalidFrame, ProtocolError

PROTOCOL_VERSION = 1
MAX_ID_CHARS = 64
MAX_TEXT_CHARS = 4000
MAX_NAME_CHARS = 64
MAX_PERSONALITY_CHARS = 64
MAX_TOKEN_CHARS = 8192
MAX_HISTORY_LIMIT = 100
DEFAULT_HISTORY_LIMIT = 50
MAX_MESSAGE_ID = 2**63 - 1


def _storable(value: str) -> str:
    """Reject what PostgreSQL text and UTF-8 cannot hold: NUL and lone surrogates."""
    if "\x00" in value:
        raise ValueError("NUL characters are not allowed")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from exc
    return value


Text = Annotated[str, AfterValidator(_storable)]
ClientId = Annotated[Text, Field(min_length=1, max_length=MAX_ID_CHARS)]
MessageId = Annotated[int, Field(ge=1, le=MAX_MESSAGE_ID)]
Personality = Annotated[Text, Field(max_length=MAX_PERSONALITY_CHARS)]


class Frame(BaseModel):
    """Base of every frame: frozen, strict, and no unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class ClientFrame(Frame):
    id: ClientId | None = None


# ---------------------------------------------------------------- client -> server


class Hello(ClientFrame):
    type: Literal["hello"]
    token: Annotated[str, Field(min_length=1, max_length=MAX_TOKEN_CHARS)]


class CreateAvatar(ClientFrame):
    type: Literal["create_avatar"]
    name: Annotated[Text, Field(min_length=1, max_length=MAX_NAME_CHARS)]
    personality: Personality


class GetAvatar(ClientFrame):
    type: Literal["get_avatar"]


class SetPersona(ClientFrame):
    type: Literal["set_persona"]
    personality: Personality


class Chat(ClientFrame):
    type: Literal["chat"]
    text: Annotated[Text, Field(min_length=1, max_length=MAX_TEXT_CHARS)]


class Cancel(ClientFrame):
    type: Literal["cancel"]


class History(ClientFrame):
    type: Literal["history"]
    limit: Annotated[int, Field(ge=1, le=MAX_HISTORY_LIMIT)] = DEFAULT_HISTORY_LIMIT
    before: MessageId | None = None


class Ping(ClientFrame):
    type: Literal["ping"]


AnyClientFrame = Annotated[
    Hello | CreateAvatar | GetAvatar | SetPersona | Chat | Cancel | History | Ping,
    Field(discriminator="type"),
]
CLIENT_ADAPTER: TypeAdapter[AnyClientFrame] = TypeAdapter(AnyClientFrame)

# ---------------------------------------------------------------- server -> client


class ServerFrame(Frame):
    """Base of the frames the server sends."""


def _is_none(value: object) -> bool:
    return value is None


class AvatarInfo(Frame):
    id: int
    name: str
    personality: str
    created_at: datetime
    updated_at: datetime


class PersonaInfo(Frame):
    id: str
    name: str
    description: str


class Limits(Frame):
    max_frame_bytes: int
    max_text_chars: int
    rate_per_s: float
    rate_burst: int  # issue 2: the burst is sent too (an addition to PROTOCOL.md)


class Welcome(ServerFrame):
    type: Literal["welcome"] = "welcome"
    ref: str | None
    session_id: str
    user_id: str
    avatar: AvatarInfo | None
    personas: list[PersonaInfo]
    protocol: int = PROTOCOL_VERSION
    server: str
    limits: Limits


class Avatar(ServerFrame):
    type: Literal["avatar"] = "avatar"
    ref: str | None
    avatar: AvatarInfo
    # in the answer to create_avatar: the persona's first message (left out when none)
    greeting: str | None = Field(default=None, exclude_if=_is_none)


class PersonaSet(ServerFrame):
    type: Literal["persona_set"] = "persona_set"
    ref: str | None
    personality: str
    previous: str


class PersonaChanged(ServerFrame):
    type: Literal["persona_changed"] = "persona_changed"
    personality: str
    previous: str


class ReplyDelta(ServerFrame):
    type: Literal["reply_delta"] = "reply_delta"
    ref: str | None
    reply_id: int
    delta: str


class Usage(Frame):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


ReplyStatus = Literal["completed", "cancelled", "interrupted", "failed"]


class Reply(ServerFrame):
    type: Literal["reply"] = "reply"
    ref: str | None
    reply_id: int
    message_id: int
    persona: str
    text: str
    status: ReplyStatus
    usage: Usage | None = Field(default=None, exclude_if=_is_none)
    replayed: bool | None = Field(default=None, exclude_if=_is_none)


class Personas(ServerFrame):
    type: Literal["personas"] = "personas"
    ref: str | None
    personas: list[PersonaInfo]


class HistoryEntry(Frame):
    id: int
    role: Literal["user", "assistant"]
    persona: str
    text: str
    created_at: datetime
    status: ReplyStatus = "completed"  # how a reply ended; a user's message is "completed"
    error: str | None = Field(default=None, exclude_if=_is_none)  # a failed reply's error code


class HistoryPage(ServerFrame):
    type: Literal["history"] = "history"
    ref: str | None
    messages: list[HistoryEntry]


class Notice(ServerFrame):
    type: Literal["notice"] = "notice"
    ref: str | None
    text: str


class Pong(ServerFrame):
    type: Literal["pong"] = "pong"
    ref: str | None


class Error(ServerFrame):
    type: Literal["error"] = "error"
    ref: str | None
    code: str
    status: int
    message: str
    details: dict[str, Any] | None = Field(default=None, exclude_if=_is_none)


AnyServerFrame = Annotated[
    Welcome
    | Avatar
    | PersonaSet
    | PersonaChanged
    | ReplyDelta
    | Reply
    | Personas
    | HistoryPage
    | Notice
    | Pong
    | Error,
    Field(discriminator="type"),
]
SERVER_ADAPTER: TypeAdapter[AnyServerFrame] = TypeAdapter(AnyServerFrame)

# ---------------------------------------------------------------- decoding and encoding

# Pydantic error types that mean "this is not a JSON object at all" rather than "this object
# is not a valid frame".
_NOT_AN_OBJECT = frozenset({"json_invalid", "json_type", "dict_type", "model_type"})


MAX_FRAME_FIELDS = 8  # a client frame has at most four (history: type, id, limit, before)


class ChatFields(NamedTuple):
    """A `chat` frame read without its model (`decode_frame`): the same fields."""

    id: str | None
    text: str
    type: Literal["chat"] = "chat"


class SetPersonaFields(NamedTuple):
    """A `set_persona` frame read without its model (`decode_frame`): the same fields."""

    id: str | None
    personality: str
    type: Literal["set_persona"] = "set_persona"


HotFrame = ChatFields | SetPersonaFields
ClientFrameRead = AnyClientFrame | HotFrame  # what `decode_frame` reads


def decode_frame(raw: str | bytes) -> ClientFrameRead:
    """What a conversation reads each frame with: the two frames of every chat loop, `chat`
    and `set_persona`, read with orjson alone (a quarter of the model's cost) when they are
    plainly valid, and every other frame by its model (`decode_client_frame`), the text read
    by orjson once for both."""
    data = _json_object(raw)
    hot = _hot_frame(data) if data is not None else None
    return hot if hot is not None else _decode_model(raw, data)


def decode_client_frame(raw: str | bytes) -> AnyClientFrame:
    """Decode one client frame from its text by its model, or raise BadJson or InvalidFrame."""
    return _decode_model(raw, _json_object(raw))


def decode_hot_frame(raw: str | bytes) -> HotFrame | None:
    """`chat` or `set_persona` read without its model when plainly valid; None for any other
    frame and anything unusual, which the model then decodes or names the fault of. It never
    accepts what `decode_client_frame` refuses, nor reads a frame differently: a property test
    in tests/protocol/test_frames.py holds the two to that."""
    data = _json_object(raw)
    return _hot_frame(data) if data is not None else None


def _json_object(raw: str | bytes) -> dict[str, Any] | None:
    """The frame's JSON object as orjson reads it; None for a binary frame, text that is not
    JSON (the model names what is wrong with it), or JSON that is not an object."""
    if isinstance(raw, bytes):
        return None
    try:
        data = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError):
        return None
    return data if type(data) is dict else None


def _decode_model(raw: str | bytes, data: dict[str, Any] | None) -> AnyClientFrame:
    if isinstance(raw, bytes):
        raise BadJson("binary frames are not accepted; send JSON in a text frame")
    if data is not None and len(data) > MAX_FRAME_FIELDS:
        # refused before the model, which builds an error for every unknown field: thousands in
        # one frame cost tens of milliseconds of the whole process's loop
        raise InvalidFrame(f"a frame has at most {MAX_FRAME_FIELDS} fields")
    try:
        return CLIENT_ADAPTER.validate_json(raw)
    except ValidationError as exc:
        raise _frame_error(exc, raw) from None


def _hot_frame(data: dict[str, Any]) -> HotFrame | None:
    kind = data.get("type")
    if kind == "chat":
        field, max_chars, least = "text", MAX_TEXT_CHARS, 1
    elif kind == "set_persona":
        field, max_chars, least = "personality", MAX_PERSONALITY_CHARS, 0
    else:
        return None
    value = data.get(field)
    ref = data.get("id")
    if len(data) != 2 + ("id" in data) or type(value) is not str:  # no other field
        return None
    if not least <= len(value) <= max_chars or "\x00" in value:
        return None
    if ref is not None and (
        type(ref) is not str or not 1 <= len(ref) <= MAX_ID_CHARS or "\x00" in ref
    ):
        return None
    # orjson takes no lone surrogate, so what it read is valid Unicode
    if kind == "chat":
        return ChatFields(ref, value)
    return SetPersonaFields(ref, value)


def _frame_error(exc: ValidationError, raw: str) -> BadJson | InvalidFrame:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    if len(errors) == 1 and not errors[0]["loc"] and errors[0]["type"] in _NOT_AN_OBJECT:
        return BadJson()
    if any(err["type"] == "json_invalid" for err in errors) or not _is_json(raw):
        return BadJson()
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"][1:]) or "frame"
    if first["type"] == "union_tag_invalid":
        return InvalidFrame("unknown frame type")
    if first["type"] == "union_tag_not_found":
        return InvalidFrame("the frame has no string field 'type'")
    return InvalidFrame(f"{where}: {first['msg']}")


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _is_json(raw: str) -> bool:
    """Strict JSON (the decoder accepts NaN and Infinity, which JSON does not have)."""
    try:
        json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return False
    return True


def _loose_object(raw: str | bytes) -> dict[str, Any] | None:
    """A frame that failed to decode, read as leniently as Python's own JSON reader reads it
    (it takes NaN and lone surrogates, which the frame decoder refuses); None when it is not
    a JSON object at all."""
    if isinstance(raw, bytes):
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            return None
    return value if isinstance(value, dict) else None


def salvage_ref(raw: str | bytes) -> str | None:
    """The `id` of a frame that failed to decode, when it is readable and valid, whatever else
    in the frame is wrong; else None."""
    value = _loose_object(raw)
    ref = None if value is None else value.get("id")
    if isinstance(ref, str) and 1 <= len(ref) <= MAX_ID_CHARS:
        try:
            return _storable(ref)
        except ValueError:
            return None
    return None


def frame_type(raw: str | bytes) -> str | None:
    """The `type` of a frame that failed to decode, when it is a readable string."""
    value = _loose_object(raw)
    kind = None if value is None else value.get("type")
    return kind if isinstance(kind, str) else None


MAX_CLOSE_REASON_BYTES = 123  # RFC 6455: a close frame's reason fits in 123 bytes of UTF-8


def close_reason(text: str) -> str:
    """`text` cut to fit a close frame's reason, on a character boundary."""
    encoded = text.encode("utf-8", "replace")
    if len(encoded) <= MAX_CLOSE_REASON_BYTES:
        return text
    return encoded[: MAX_CLOSE_REASON_BYTES - 3].decode("utf-8", "ignore") + "..."


HISTORY_PAGE_BYTES = 512 * 1024  # under the 1 MiB frame limit of common WebSocket clients
_ENTRY_OVERHEAD_BYTES = 128  # the fields of a history entry besides its text


def fit_history_page(messages: list[HistoryEntry]) -> list[HistoryEntry]:
    """The newest messages (oldest first) whose JSON fits in HISTORY_PAGE_BYTES, at least one;
    the client pages on with `before` for the rest."""
    used = 0
    for kept, message in enumerate(reversed(messages)):
        used += len(orjson.dumps(message.text)) + _ENTRY_OVERHEAD_BYTES
        if used > HISTORY_PAGE_BYTES and kept:
            return messages[len(messages) - kept :]
    return messages


def encode(frame: ServerFrame) -> bytes:
    """One server frame as UTF-8 JSON; optional fields that are None are left out."""
    return frame.__pydantic_serializer__.to_json(frame)


_NO_PERSONAS = b'"personas":[]'


def encode_listing(frame: Welcome | Personas, personas_json: bytes) -> bytes:
    """`encode(frame)` with `personas_json` (a JSON array of {id, name, description}, encoded
    once per catalogue version) as its `personas`, which `frame` has empty: a welcome lists
    the whole enabled catalogue, thousands of personas for some, and encoding them for every
    hello would cost milliseconds. tests/protocol/test_frames.py holds it to `encode`."""
    if frame.personas:
        raise ValueError("encode_listing takes a frame whose personas are empty")
    raw = encode(frame)
    # strings in the frame are JSON-escaped, so only the field itself matches
    return raw.replace(_NO_PERSONAS, b'"personas":' + personas_json, 1)


def encode_reply(
    ref: str | None, reply_id: int, message_id: int, persona: str, text: str, status: ReplyStatus
) -> bytes:
    """`encode(Reply(...))` for a reply without usage or replay flag, byte for byte, without
    building the model: the server's most frequent frame, whose every field was checked before
    it got here (the ref and text in a validated frame, the persona in the catalogue, the rest
    by the database). tests/protocol/test_frames.py holds the two encoders to the same bytes."""
    return orjson.dumps(
        {
            "type": "reply",
            "ref": ref,
            "reply_id": reply_id,
            "message_id": message_id,
            "persona": persona,
            "text": text,
            "status": status,
        }
    )


def encode_reply_delta(ref: str | None, reply_id: int, delta: str) -> bytes:
    """`encode(ReplyDelta(...))`, byte for byte, without building the model: a streamed reply
    sends one for every few tokens. tests/protocol/test_frames.py holds the two to the same
    bytes."""
    return orjson.dumps({"type": "reply_delta", "ref": ref, "reply_id": reply_id, "delta": delta})


def decode_server_frame(raw: str | bytes) -> AnyServerFrame:
    """Decode one server frame (for clients, bots and tests)."""
    return SERVER_ADAPTER.validate_json(raw)


def error_frame(exc: Exception, ref: str | None) -> Error:
    """The one mapping from an exception to an `error` frame; anything unexpected is `internal`."""
    if not isinstance(exc, ProtocolError):
        exc = Internal()
    return Error(
        ref=ref, code=exc.code, status=exc.status, message=exc.message, details=exc.details
    )
