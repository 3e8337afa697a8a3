"""Character cards as data: V1, V2, V3 and this project's card parsed, exported as written, and
every bad card refused with one line that names the field path."""

from __future__ import annotations

import copy
import json
import re
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.cards import (
    BACKFILL_NOTE,
    EXTENSION,
    MAX_CARD_BYTES,
    SPEC_V2,
    SPEC_V3,
    CardError,
    backfill_v2,
    export_card,
    export_project,
    field_path,
    fill_macros,
    greeting_for,
    has_macros,
    is_slug,
    parse_card,
    persona_card,
    slug_for,
)
from protocol.errors import ClientError
from tests.personas import builtin_cards, get_card

CARDS = Path(__file__).parent.parent / "fixtures" / "cards"


def load(name: str) -> Any:
    return json.loads((CARDS / name).read_text(encoding="utf-8"))


def v3(**data: Any) -> dict[str, Any]:
    return {"spec": SPEC_V3, "spec_version": "3.0", "data": {"name": "Ada", **data}}


def error_of(value: object) -> str:
    with pytest.raises(CardError) as caught:
        parse_card(value)
    return caught.value.message


# --- parsing each version ---


def test_v2_card_parses_with_its_fields() -> None:
    parsed = parse_card(load("v2_wren.json"))
    assert parsed.spec == "v2" and parsed.notes == () and parsed.material is None
    assert parsed.name == "Wren Halloway" and parsed.persona_id == "wren-halloway"
    assert parsed.data.tags == ["lighthouse", "cozy", "storm"]
    assert parsed.data.character_book is not None
    assert parsed.data.character_book.entries[0].keys == ["lamp", "light"]


def test_v3_card_parses_with_its_material() -> None:
    parsed = parse_card(load("v3_mirela.json"))
    assert parsed.spec == "v3" and parsed.notes == ()
    assert parsed.data.nickname == "Mira" and parsed.data.creation_date == 1714600000
    assert parsed.material is not None
    assert parsed.material.openers == ["Oh, hello!", "Ah, a visitor!"]


def test_card_without_spec_is_read_as_v1_with_a_note() -> None:
    parsed = parse_card(load("v1_tobias.json"))
    assert parsed.spec == "v1"
    assert parsed.notes == ("no spec: read as a Character Card V1",)
    assert parsed.data.first_mes.startswith("Ah, a customer!")
    assert parsed.data.system_prompt == "" and parsed.data.extensions == {}


def test_newer_v3_spec_version_is_read_with_a_note() -> None:
    card = {**v3(), "spec_version": "3.5"}
    assert parse_card(card).notes == (
        "spec_version 3.5 is newer than 3.0: fields it adds are kept",
    )


# --- export keeps what was written ---


@pytest.mark.parametrize(("name", "spec"), [("v2_wren.json", "v2"), ("v3_mirela.json", "v3")])
def test_export_in_its_own_spec_gives_back_the_card(name: str, spec: Any) -> None:
    card = load(name)
    assert export_card(parse_card(card), spec) == card


def test_unknown_fields_and_extensions_survive_import_then_export() -> None:
    exported = export_card(parse_card(load("v3_mirela.json")), "v3")
    assert exported["x_unknown_top_field"] == "kept as written"
    assert exported["data"]["x_unknown_data_field"] == {"nested": [1, 2, {"deep": "value"}]}
    assert exported["data"]["extensions"]["example_app"] == {"theme": ["sepia", 3, None, 1.5]}
    assert exported["data"]["extensions"][EXTENSION]["future_field"] == {"kept": True}


def test_export_returns_new_objects_each_time() -> None:
    parsed = parse_card(load("v3_mirela.json"))
    first = export_card(parsed, "v3")
    first["data"]["extensions"]["example_app"]["theme"].append("changed")
    assert export_card(parsed, "v3") == load("v3_mirela.json")


def test_v2_card_exported_as_v3_changes_only_the_spec_and_adds_group_greetings() -> None:
    card = load("v2_wren.json")
    exported = export_card(parse_card(card), "v3")
    expected = copy.deepcopy(card)
    expected["spec"], expected["spec_version"] = SPEC_V3, "3.0"
    expected["data"]["group_only_greetings"] = []
    assert exported == expected


def test_v3_card_exported_as_v2_keeps_its_v3_fields() -> None:
    card = load("v3_mirela.json")
    exported = export_card(parse_card(card), "v2")
    assert exported == {**card, "spec": SPEC_V2, "spec_version": "2.0"}


def test_v1_card_exported_as_v2_has_its_fields_in_data_and_at_the_top() -> None:
    card = load("v1_tobias.json")
    exported = export_card(parse_card(card), "v2")
    assert exported["spec"] == SPEC_V2 and exported["spec_version"] == "2.0"
    assert {key: exported[key] for key in card} == card
    assert exported["data"] == {
        **{key: card[key] for key in ("name", "description", "personality", "scenario")},
        "first_mes": card["first_mes"],
        "mes_example": card["mes_example"],
        "creator_notes": "",
        "system_prompt": "",
        "post_history_instructions": "",
        "alternate_greetings": [],
        "tags": [],
        "creator": "",
        "character_version": "",
        "extensions": {},
    }


def test_missing_mandatory_fields_are_filled_on_export() -> None:
    exported = export_card(parse_card(v3(tags=["a"])), "v3")
    assert exported["data"]["tags"] == ["a"]
    assert exported["data"]["group_only_greetings"] == [] and exported["data"]["extensions"] == {}
    assert exported["data"]["first_mes"] == "" and exported["data"]["creator_notes"] == ""


def test_missing_spec_version_is_filled_on_export() -> None:
    card = {"spec": SPEC_V2, "data": {"name": "Ada"}}
    assert export_card(parse_card(card), "v2")["spec_version"] == "2.0"


def test_backfilled_v2_says_so_and_the_note_is_trimmed_on_import() -> None:
    parsed = parse_card(load("v3_mirela.json"))
    backfill = backfill_v2(parsed)
    assert backfill["spec"] == SPEC_V2
    assert backfill["data"]["creator_notes"] == (
        BACKFILL_NOTE + "\n\nWritten for the persona chat test suite."
    )
    assert parse_card(backfill).data.creator_notes == "Written for the persona chat test suite."


def test_project_card_round_trips_with_its_id_and_enabled_flag() -> None:
    parsed = parse_card(load("v2_wren.json"))
    project = export_project(parsed)
    assert project["persona_chat_card"] == 1 and project["id"] == "wren-halloway"
    again = parse_card({**project, "id": "wren", "enabled": False})
    assert again.persona_id == "wren" and again.enabled is False
    assert export_card(again, "v3") == project["card"]


# --- slugs ---


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("Friendly", "friendly"),
        ("Zoë the Bold!", "zoe-the-bold"),
        ("  Mr. O'Neil  ", "mr-o-neil"),
        ("猫", "persona"),
        ("x" * 80, "x" * 64),
        ("a" * 63 + " b", "a" * 63),
    ],
)
def test_slug_for_makes_an_id_of_a_name(name: str, slug: str) -> None:
    assert slug_for(name) == slug
    assert is_slug(slug)


@pytest.mark.parametrize("text", ["a", "0", "a_b-c", "x" * 64])
def test_is_slug_accepts_ids_of_the_rule(text: str) -> None:
    assert is_slug(text)


@pytest.mark.parametrize("text", ["", "-a", "_a", "A", "a b", "é", "x" * 65, "a.b"])
def test_is_slug_refuses_anything_else(text: str) -> None:
    assert not is_slug(text)


# --- every bad card: one line naming the field path ---

BAD_CARDS: list[tuple[object, str]] = [
    ([1, 2], "card: expected an object (a character card)"),
    ("card", "card: expected an object (a character card)"),
    ({"description": "no name"}, "name: required"),
    ({"name": "  "}, "name: must not be empty"),
    ({"name": 7}, "name: expected a string"),
    (
        {"spec": "chara_card_v4", "data": {}},
        'spec: expected "chara_card_v2" or "chara_card_v3" (or no spec, for V1)',
    ),
    ({"spec": SPEC_V2}, "data: required"),
    ({"spec": SPEC_V2, "data": []}, "data: expected an object"),
    ({"spec": SPEC_V2, "data": {"description": "x"}}, "data.name: required"),
    ({"spec": SPEC_V3, "data": {"name": ""}}, "data.name: must not be empty"),
    (v3(tags=["a", "b", 3]), "data.tags[2]: expected a string"),
    (v3(tags="a"), "data.tags: expected a list"),
    (v3(extensions=[]), "data.extensions: expected an object"),
    (v3(creation_date="today"), "data.creation_date: expected a number"),
    (v3(creation_date=True), "data.creation_date: expected a number"),
    (v3(creator_notes_multilingual={"en-GB": 1}), 'data.creator_notes_multilingual["en-GB"]: '
     "expected a string"),
    (v3(character_book={"entries": [{"keys": ["a"]}]}), "data.character_book.entries[0]."
     "content: required"),
    (v3(character_book={"entries": [{"keys": "a", "content": ""}]}), "data.character_book."
     "entries[0].keys: expected a list"),
    (v3(character_book={"entries": [{"keys": [], "content": "", "enabled": "yes"}]}),
     "data.character_book.entries[0].enabled: expected true or false"),
    (v3(assets=[{"type": "icon", "uri": "ccdefault:", "name": "main"}]), "data.assets[0].ext: "
     "required"),
    ({**v3(), "spec_version": 3}, "spec_version: expected a string"),
    (v3(extensions={EXTENSION: {"openers": []}}), "data.extensions.persona_chat.openers: must "
     "not be empty"),
    (v3(extensions={EXTENSION: {"reflections": ["{topic}", "no slot"]}}), "data.extensions."
     "persona_chat.reflections[1]: must contain {topic} once"),
    (v3(extensions={EXTENSION: {"callback": "nothing"}}), "data.extensions.persona_chat."
     "callback: must contain {earlier} once"),
    (v3(extensions={EXTENSION: {"sign_off": 1}}), "data.extensions.persona_chat.sign_off: "
     "expected a string"),
    (v3(extensions={"x": {"when": date(2024, 5, 1)}}), "data.extensions.x.when: expected a JSON "
     "value, not a date"),
    (v3(mes_example=float("nan")), "data.mes_example: expected a finite number"),
    (v3(description="\ud800"), "data.description: not valid Unicode text (a lone surrogate)"),
    ({"persona_chat_card": 2, "card": v3()}, "persona_chat_card: expected 1 (the version of "
     "this format)"),
    ({"persona_chat_card": 1}, "card: required"),
    ({"persona_chat_card": 1, "card": v3(), "name": "x"}, "name: unknown field (id, enabled "
     "and card are known)"),
    ({"persona_chat_card": 1, "id": "Not A Slug", "card": v3()}, "id: expected a slug: 1-64 "
     "characters of a-z, 0-9, _ and -, starting with a letter or a digit"),
    ({"persona_chat_card": 1, "id": 5, "card": v3()}, "id: expected a string"),
    ({"persona_chat_card": 1, "enabled": "no", "card": v3()}, "enabled: expected true or false"),
    ({"persona_chat_card": 1, "card": v3(tags=[1])}, "card.data.tags[0]: expected a string"),
    ({"name": "Ada", "x": {1: "one"}}, "x: keys must be strings of valid Unicode"),
]  # fmt: skip


@pytest.mark.parametrize(("value", "message"), BAD_CARDS)
def test_bad_card_is_refused_with_one_line_naming_the_field(value: object, message: str) -> None:
    assert error_of(value) == message


def test_card_over_256_kib_is_refused() -> None:
    card = v3(description="x" * MAX_CARD_BYTES)
    size = len(json.dumps(card, ensure_ascii=False).encode())
    assert error_of(card) == f"card: over 256 KiB ({size} bytes)"


def test_project_card_over_256_kib_is_refused() -> None:
    card = v3(description="x" * MAX_CARD_BYTES)
    size = len(json.dumps(card, ensure_ascii=False).encode())
    project = {"persona_chat_card": 1, "card": card}
    assert error_of(project) == f"card: over 256 KiB ({size} bytes)"


def test_spec_version_that_is_not_a_number_is_kept_without_a_note() -> None:
    card = {**v3(), "spec_version": "3.0-draft"}
    parsed = parse_card(card)
    assert parsed.notes == () and export_card(parsed, "v3")["spec_version"] == "3.0-draft"


def test_card_error_is_a_client_error_with_its_path() -> None:
    with pytest.raises(CardError) as caught:
        parse_card(v3(tags=[1]))
    error = caught.value
    assert isinstance(error, ClientError) and error.code == "invalid_card" and error.status == 422
    assert error.path == "data.tags[0]" and error.reason == "expected a string"
    assert error.in_file("a.json").message == "a.json: data.tags[0]: expected a string"


def test_field_path_quotes_keys_that_are_not_names() -> None:
    assert field_path(("data", "extensions", "a b", 0, "c")) == 'data.extensions["a b"][0].c'
    assert field_path(()) == "card"


# --- random input: a card, or a one-line error that starts with a field path ---

PATH_THEN_REASON = re.compile(
    r'(?:[A-Za-z_]\w*|\["(?:[^"\\]|\\.)*"\])(?:\.[A-Za-z_]\w*|\[\d+\]|\["(?:[^"\\]|\\.)*"\])*'
    r": \S[^\n]*"
)
DATA_FIELDS = [
    "name", "description", "first_mes", "tags", "alternate_greetings", "extensions",
    "character_book", "assets", "creation_date", "creator_notes_multilingual", "nickname",
]  # fmt: skip
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)
card_like = st.fixed_dictionaries(
    {
        "spec": st.sampled_from([SPEC_V2, SPEC_V3]),
        "data": st.dictionaries(st.sampled_from(DATA_FIELDS), json_values)
        | st.fixed_dictionaries(
            {"name": st.text(min_size=1, max_size=5)},
            optional={key: json_values for key in DATA_FIELDS[1:]},
        ),
    }
)
project_like = st.fixed_dictionaries(
    {"persona_chat_card": st.just(1), "card": card_like},
    optional={"id": json_values | st.text(max_size=5), "enabled": json_values},
)
v1_like = st.dictionaries(st.sampled_from(["name", "description", "personality"]), json_values)


@settings(max_examples=400, deadline=None)
@given(json_values | card_like | project_like | v1_like)
def test_random_values_parse_or_fail_with_a_field_path(value: object) -> None:
    try:
        parsed = parse_card(value)
    except CardError as error:
        assert PATH_THEN_REASON.fullmatch(error.message), error.message
    else:
        exported = export_card(parsed, "v3")
        assert parse_card(exported).data == parsed.data  # what parses, exports and parses again


# --- the six built-in personas as cards ---


def test_builtin_cards_export_as_v3_json_and_parse_again() -> None:
    for parsed in builtin_cards():
        exported = json.loads(json.dumps(export_card(parsed, "v3")))
        assert persona_card(parse_card(exported)).openers == get_card(parsed.persona_id).openers


# --- a card without this project's material ---


def test_card_without_material_gets_material_of_its_own_with_its_macros_kept() -> None:
    persona = persona_card(parse_card(load("v2_wren.json")))
    assert persona.id == "wren-halloway"
    assert persona.system_prompt == (
        "You are {{char}}, a lighthouse keeper. Stay in character and keep replies short."
    )
    assert (persona.personality, persona.scenario) == (
        "dry, kind, stubborn about the weather",
        "A storm has stranded {{user}} at the lighthouse for the night.",
    )
    assert persona.description.startswith("{{char}} keeps the lighthouse")
    assert persona.post_history_instruction == "Reply as {{char}} in at most three sentences."
    assert persona.example_blocks == (
        "{{user}}: Is the storm bad?\n{{char}}: I've seen worse. I've also seen better, and I"
        " preferred those.",
    )
    line = "I've seen worse. I've also seen better, and I preferred those."
    assert persona.example_lines == (line,)
    assert persona.follow_ups == (line,)  # the example lines, in the character's own voice
    assert persona.openers and all(line.count("{topic}") == 1 for line in persona.reflections)
    assert persona.switched == (  # on arrival: the greeting's first sentences
        "Switching gears: {{char}} is here now. Shut the door behind you, the wind has opinions"
        " tonight. Tea?"
    )
    assert persona.line_macros and persona.sign_off == ""


def test_card_with_only_a_description_says_its_first_sentence_on_arrival() -> None:
    card = v3(first_mes="", mes_example="", description="{{char}} bakes bread. Lots of it.")
    persona = persona_card(parse_card(card))
    assert persona.switched == (
        "Switching gears: {{char}} is here now. {{char}} bakes bread. Lots of it."
    )
    assert persona.follow_ups == ("What happened next?", "How do you feel about it?")
    assert persona.system_prompt == (
        "Write {{char}}'s next reply in a fictional chat between {{char}} and {{user}}."
    )
    unfinished = persona_card(parse_card(v3(first_mes="", description="[Nova: tall; " * 40)))
    assert unfinished.switched == "Switching gears: {{char}} is here now."


def test_blank_material_lines_are_left_out_and_defaults_fill_an_empty_list() -> None:
    material = {"openers": [" ", "Hey!"], "wordless": [""], "sign_off": "  ", "switched": ""}
    persona = persona_card(parse_card(v3(extensions={EXTENSION: material})))
    assert persona.openers == ("Hey!",)
    assert persona.wordless == ("I'm listening.",)
    assert persona.sign_off == ""
    assert persona.switched.startswith("Switching gears: {{char}} is here now.")


def test_macros_are_filled_in_one_pass_in_any_case() -> None:
    text = "{{char}}, {{Char}}, <BOT>, <bot>: {{user}} {{USER}} <User>; {{chars}} <b>"
    assert fill_macros(text, "Ava", "bo") == "Ava, Ava, Ava, Ava: bo bo bo; {{chars}} <b>"
    assert fill_macros("{{char}} meets {{user}}", "{{user}}", "<BOT>") == "{{user}} meets <BOT>"
    assert fill_macros("no macro", "Ava", "bo") == "no macro"
    assert has_macros("Hi <USER>!") and not has_macros("{{ char }} <bots>")


def test_greeting_is_first_mes_with_the_avatars_name_and_the_users() -> None:
    ada = persona_card(parse_card(v3(first_mes="\n{{user}}! <BOT> is here.\n")))
    assert greeting_for(ada, "Ava", "user-1") == "user-1! Ava is here."
    assert greeting_for(ada, "", "") == "User! Ada is here."
    assert greeting_for(persona_card(parse_card(v3(first_mes=""))), "Ava", "bo") == ""
    assert greeting_for(get_card("friendly"), "Ava", "bo") == (
        "Hey there! Great to see you. What's on your mind?"
    )
