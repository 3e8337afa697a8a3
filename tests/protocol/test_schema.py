"""The JSON Schema export."""

from __future__ import annotations

from protocol.schema import json_schema


def _frame_types(union: dict[str, object]) -> set[str]:
    mapping = union["discriminator"]
    assert isinstance(mapping, dict)
    return set(mapping["mapping"])


def test_schema_names_every_frame_in_both_directions() -> None:
    schema = json_schema()
    assert _frame_types(schema["client_to_server"]) == {
        "hello", "create_avatar", "get_avatar", "set_persona", "chat", "cancel", "history", "ping",
    }  # fmt: skip
    assert _frame_types(schema["server_to_client"]) == {
        "welcome", "avatar", "persona_set", "persona_changed", "reply_delta", "reply",
        "personas", "history", "notice", "pong", "error",
    }  # fmt: skip


def test_schema_forbids_unknown_fields_in_client_frames() -> None:
    defs = json_schema()["client_to_server"]["$defs"]
    assert all(d.get("additionalProperties") is False for d in defs.values() if "properties" in d)
