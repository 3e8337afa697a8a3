"""The LLM prompt as a pure function: exactly what the model receives for a persona and history."""

from __future__ import annotations

import json
import os
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Literal, NoReturn

import pytest
from gguf import GGUFReader
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from protocol.cards import PersonaCard, parse_card, persona_card
from protocol.conversation.records import PastMessage
from server.render import (
    OTHER_PERSONA_CHARS,
    ChatMessage,
    build_prompt,
    notes_in_user_turns,
    persona_system_prompt,
    shorten,
    switch_note,
)
from tests.personas import BUILTIN_CARDS, BUILTIN_IDS, get_card

FRIENDLY = get_card("friendly")
WITTY = get_card("witty")
OTHERS = {card.id: card for card in BUILTIN_CARDS}.get  # the catalogue's lookup, by id
HISTORY = (
    PastMessage("user", "I adopted a cat"),
    PastMessage("assistant", "How lovely! What is its name?"),
)


def test_prompt_is_system_history_text_then_post_history_instruction() -> None:
    messages = build_prompt(FRIENDLY, HISTORY, "She is called Miso")
    assert messages == [
        {"role": "system", "content": persona_system_prompt(FRIENDLY)},
        {"role": "user", "content": "I adopted a cat"},
        {"role": "assistant", "content": "How lovely! What is its name?"},
        {"role": "user", "content": "She is called Miso"},
        {"role": "system", "content": FRIENDLY.post_history_instruction},
    ]


def test_prompt_without_history_has_system_text_and_instruction() -> None:
    messages = build_prompt(WITTY, (), "hello")
    assert [m["role"] for m in messages] == ["system", "user", "system"]
    assert messages[1]["content"] == "hello"


def test_system_prompt_starts_with_the_cards_system_prompt() -> None:
    assert persona_system_prompt(WITTY).startswith(WITTY.system_prompt)


def test_system_prompt_holds_description_style_rules_and_example_dialogue() -> None:
    assert persona_system_prompt(FRIENDLY, "Ava", "alice") == (
        "You are a friendly companion. You are warm, encouraging and relaxed. You speak plainly"
        " and make the user feel welcome."
        "\n\nWarm, upbeat and easy to talk to, like a good neighbour."
        "\n\nStyle rules:\n- Keep sentences short and warm.\n- Use the user's own words when you"
        " answer.\n- End with an open, friendly question."
        "\n\n[Example Chat]\nAva: That sounds like a lovely day!"
        "\n\n[Example Chat]\nAva: Oh nice, tell me more about it."
        "\n\n[Start a new Chat]"
    )
    assert persona_system_prompt(FRIENDLY).count("\nFriendly: ") == 2  # no avatar: the card's name


CARDS = Path(__file__).parent.parent / "fixtures" / "cards"


def imported(name: str, **changes: object) -> PersonaCard:
    """A card of the fixtures as the generators get it, its `data` fields changed."""
    value = json.loads((CARDS / name).read_text(encoding="utf-8"))
    value.get("data", value).update(changes)
    return persona_card(parse_card(value))


def test_imported_card_is_rendered_in_sillytavern_order_with_its_macros_filled() -> None:
    wren = imported("v2_wren.json")
    messages = build_prompt(wren, HISTORY, "Is it safe?", avatar_name="Ava", user_name="alice")
    assert messages == [
        {
            "role": "system",
            "content": "You are Ava, a lighthouse keeper. Stay in character and keep replies short."
            "\n\nAva keeps the lighthouse on Gull Rock and writes letters to ships that never"
            " answer."
            "\n\nAva's personality: dry, kind, stubborn about the weather"
            "\n\nScenario: A storm has stranded alice at the lighthouse for the night."
            "\n\n[Example Chat]\nalice: Is the storm bad?\nAva: I've seen worse. I've also seen"
            " better, and I preferred those."
            "\n\n[Start a new Chat]",
        },
        {"role": "user", "content": "I adopted a cat"},
        {"role": "assistant", "content": "How lovely! What is its name?"},
        {"role": "user", "content": "Is it safe?"},
        {"role": "system", "content": "Reply as Ava in at most three sentences."},
    ]


def test_card_without_a_system_prompt_gets_the_default_one() -> None:
    tobias = imported("v1_tobias.json")  # a V1 card: no system prompt, no post-history
    messages = build_prompt(tobias, (), "Can you fix it?", user_name="alice")
    assert messages[0]["content"].startswith(
        "Write Tobias Fennick's next reply in a fictional chat between Tobias Fennick and alice."
        "\n\nTobias Fennick is a retired clockmaker"
    )
    assert messages[1:] == [{"role": "user", "content": "Can you fix it?"}]  # nothing after


def test_original_stands_for_the_default_prompt_and_for_nothing_after_the_history() -> None:
    card = imported(
        "v2_wren.json",
        system_prompt="{{original}} Be brief.",
        post_history_instructions="{{ORIGINAL}}Stay in character as <BOT>.",
    )
    messages = build_prompt(card, (), "hi", avatar_name="Ava", user_name="bo")
    assert messages[0]["content"].startswith(
        "Write Ava's next reply in a fictional chat between Ava and bo. Be brief.\n\n"
    )
    assert messages[-1] == {"role": "system", "content": "Stay in character as Ava."}


def test_example_dialogue_is_split_on_start_and_keeps_each_blocks_lines() -> None:
    card = imported(
        "v2_wren.json",
        mes_example="<START>\n{{user}}: Hi\n{{char}}: *waves* Hello.\n\n<start>\n<BOT>: Tea?"
        "\n<USER>: Yes.\n<START>\n\n<START>",
    )
    prompt = persona_system_prompt(card, "Ava", "bo")
    assert prompt.endswith(
        "\n\n[Example Chat]\nbo: Hi\nAva: *waves* Hello."
        "\n\n[Example Chat]\nAva: Tea?\nbo: Yes.\n\n[Start a new Chat]"
    )
    assert card.example_lines == ("*waves* Hello.", "Tea?")


def test_user_text_and_history_are_never_read_for_macros() -> None:
    recent = (PastMessage("user", "{{char}} and <USER>"), PastMessage("assistant", "{{user}}!"))
    messages = build_prompt(FRIENDLY, recent, "{{char}}?", avatar_name="Ava", user_name="bo")
    assert [m["content"] for m in messages[1:4]] == [
        "{{char}} and <USER>",
        "{{user}}!",
        "{{char}}?",
    ]


def test_every_persona_gets_its_own_system_prompt() -> None:
    prompts = {persona_system_prompt(card) for card in BUILTIN_CARDS}
    assert len(prompts) == len(BUILTIN_CARDS)


def test_post_history_instruction_is_the_last_message() -> None:
    for card in BUILTIN_CARDS:
        assert build_prompt(card, HISTORY, "hi")[-1] == {
            "role": "system",
            "content": card.post_history_instruction,
        }


def test_same_history_under_two_personas_differs_only_in_persona_messages() -> None:
    friendly = build_prompt(FRIENDLY, HISTORY, "hi")
    witty = build_prompt(WITTY, HISTORY, "hi")
    assert friendly[1:-1] == witty[1:-1]
    assert friendly[0] != witty[0]
    assert friendly[-1] != witty[-1]


def test_blank_history_messages_are_left_out() -> None:
    recent = (PastMessage("user", "hi"), PastMessage("assistant", "  \n"))
    messages = build_prompt(FRIENDLY, recent, "still there?")
    assert [m["content"] for m in messages[1:-1]] == ["hi", "still there?"]


def test_user_text_is_sent_verbatim() -> None:
    text = "  /not a command\n with {braces} and émoji 🎈 "
    assert build_prompt(FRIENDLY, (), text)[-2] == {"role": "user", "content": text}


def test_rendering_twice_gives_equal_but_separate_lists() -> None:
    first = build_prompt(FRIENDLY, HISTORY, "hi")
    second = build_prompt(FRIENDLY, HISTORY, "hi")
    assert first == second
    assert first is not second
    first.append({"role": "user", "content": "mutated"})
    assert build_prompt(FRIENDLY, HISTORY, "hi") == second


# ---------------------------------------------------------------- persona switches

CARING = get_card("caring")
LONG = "Autumn is the best, with its golden leaves and warm drinks and long walks. " * 3
SWITCHED = (  # friendly, then witty, then (the reply being generated) caring
    PastMessage("user", "Hi! What is your favourite season?", "friendly"),
    PastMessage("assistant", LONG, "friendly"),
    PastMessage("user", "And Mondays?", "witty"),
    PastMessage("assistant", "Mondays: the universe's little joke.", "witty"),
    PastMessage("user", "I feel tired", "caring"),
    PastMessage("assistant", "Rest, dear. You have earned it.", "caring"),
    PastMessage("user", "Thank you", "witty"),
    PastMessage("assistant", "Gratitude, how refreshingly old-fashioned.", "witty"),
)


def history_of(persona: str) -> tuple[PastMessage, ...]:
    return tuple(PastMessage(m.role, m.text, persona) for m in HISTORY)


def note(old: str, new: PersonaCard, examples: str = "") -> ChatMessage:
    return {
        "role": "system",
        "content": f"Persona switch: from {old} to {new.name}. The replies before this point were"
        f" written as {old}. From here on, speak only as {new.name}, and do not continue {old}'s"
        f" tone.\n{new.name}: {new.description}{examples}",
    }


def test_switches_are_marked_where_they_happened_and_old_voices_are_cut() -> None:
    messages = build_prompt(CARING, SWITCHED, "Good night", other_persona_chars=40, others=OTHERS)
    examples = "\nExample lines in Caring's voice:\n- " + "\n- ".join(CARING.example_lines)
    assert messages == [
        {"role": "system", "content": persona_system_prompt(CARING)},
        {"role": "user", "content": "Hi! What is your favourite season?"},
        {"role": "assistant", "content": "Autumn is the best, with its golden…"},
        note("Friendly", WITTY),
        {"role": "user", "content": "And Mondays?"},
        {"role": "assistant", "content": "Mondays: the universe's little joke."},  # 36 chars
        note("Witty", CARING),
        {"role": "user", "content": "I feel tired"},
        {"role": "assistant", "content": "Rest, dear. You have earned it."},  # caring's own
        note("Caring", WITTY),
        {"role": "user", "content": "Thank you"},
        {"role": "assistant", "content": "Gratitude, how refreshingly…"},
        note("Witty", CARING, examples),  # the reply being generated is the first after one
        {"role": "user", "content": "Good night"},
        {"role": "system", "content": CARING.post_history_instruction},
    ]


def test_marker_names_both_personas_the_new_ones_summary_and_says_speak_only_as_it() -> None:
    marker = switch_note("friendly", WITTY, others=OTHERS)
    assert marker.startswith("Persona switch: from Friendly to Witty.")
    assert "speak only as Witty" in marker
    assert f"\nWitty: {WITTY.description}" in marker
    assert "Example lines" not in marker
    assert marker.count("\n") == 1  # short: two lines


def test_marker_to_an_imported_card_fills_its_macros_and_sums_it_up_in_400_characters() -> None:
    wren = imported("v2_wren.json", description="{{char}} hums to <USER>. " + "La " * 300)
    marker = switch_note("friendly", wren, True, OTHERS, "Ava", "bo")
    summary = marker.split("\n")[1]
    assert summary.startswith("Wren Halloway: Ava hums to bo. La La") and summary.endswith("La…")
    assert len(summary) < len("Wren Halloway: ") + 400
    assert marker.endswith(
        "Example lines in Wren Halloway's voice:\n- I've seen worse. I've also seen better,"
        " and I preferred those."
    )
    bare = imported("v1_tobias.json", description="")
    assert "\n" not in switch_note("friendly", bare, others=OTHERS)  # nothing to sum up


def test_old_voice_is_cut_to_the_default_of_400_characters() -> None:
    long = "word " * 200
    recent = (PastMessage("user", "hi", "friendly"), PastMessage("assistant", long, "friendly"))
    cut = build_prompt(WITTY, recent, "hi")[2]["content"]
    assert len(cut) == OTHER_PERSONA_CHARS == 400 and cut == "word " * 79 + "word…"
    own = build_prompt(FRIENDLY, recent, "hi")  # the same persona: no switch, nothing cut
    assert own[2]["content"] == long
    assert [m["role"] for m in own] == ["system", "user", "assistant", "user", "system"]


def test_no_limit_of_zero_leaves_old_voices_out_but_keeps_the_marker() -> None:
    messages = build_prompt(
        WITTY, history_of("friendly"), "hi", other_persona_chars=0, others=OTHERS
    )
    assert [m["role"] for m in messages] == ["system", "user", "system", "user", "system"]
    assert messages[2]["content"].startswith("Persona switch: from Friendly to Witty.")


def test_shorten_cuts_after_a_whole_word_within_the_limit() -> None:
    assert shorten("one two three", 13) == "one two three"
    assert shorten("one two three", 12) == "one two…"
    assert shorten("one two three", 8) == "one two…"
    assert shorten("one two three", 7) == "one…"
    assert shorten("abcdefghij", 5) == "abcd…"  # one long word: cut inside it
    assert shorten("abc", 1) == "…"
    assert shorten("abc", 0) == ""


def test_switch_with_nothing_between_is_one_marker_from_the_first_to_the_last() -> None:
    recent = (
        PastMessage("user", "hi", "friendly"),
        PastMessage("assistant", "Hello!", "friendly"),
        PastMessage("assistant", "Well.", "witty"),  # not in this window, in real life
    )
    messages = build_prompt(CARING, recent, "and now?", other_persona_chars=0, others=OTHERS)
    assert [m["role"] for m in messages] == ["system", "user", "system", "user", "system"]
    assert messages[2]["content"].startswith("Persona switch: from Friendly to Caring.")


def test_switch_back_with_the_other_voice_left_out_is_no_switch() -> None:
    recent = (*history_of("friendly"), *history_of("witty"))
    messages = build_prompt(FRIENDLY, recent[:2] + recent[3:], "hi", other_persona_chars=0)
    assert not any(m["content"].startswith("Persona switch") for m in messages)


def test_messages_of_no_known_persona_are_neither_marked_nor_cut() -> None:
    recent = (PastMessage("user", "hi"), PastMessage("assistant", "x" * 500))
    assert build_prompt(WITTY, recent, "hi", other_persona_chars=10)[2]["content"] == "x" * 500


def test_first_reply_after_a_switch_gets_the_example_lines_even_with_a_full_window() -> None:
    full = tuple(
        PastMessage(role, "blah " * 300, "friendly")
        for _ in range(6)
        for role in ("user", "assistant")
    )
    messages = build_prompt(WITTY, full, "hi")
    marker = messages[-3]
    assert marker["role"] == "system" and marker["content"].endswith(
        "Example lines in Witty's voice:\n- " + "\n- ".join(WITTY.example_lines)
    )
    assert build_prompt(WITTY, (*full, PastMessage("assistant", "Ah.", "witty")), "hi")[-3] == {
        "role": "assistant",
        "content": "Ah.",
    }  # the second reply after it: no marker any more


# ---------------------------------------------------------------- the shape, role by role


class SystemMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system"]
    content: Annotated[str, Field(min_length=1)]


class UserMessage(SystemMessage):
    role: Literal["user"]  # type: ignore[assignment]


class AssistantMessage(SystemMessage):
    role: Literal["assistant"]  # type: ignore[assignment]


OPENAI_MESSAGES = TypeAdapter(
    list[Annotated[SystemMessage | UserMessage | AssistantMessage, Field(discriminator="role")]]
)
PERSONA_OR_NONE = st.sampled_from(("", *BUILTIN_IDS))
past = st.builds(
    PastMessage,
    st.sampled_from(("user", "assistant")),
    st.one_of(st.sampled_from(("", " \n", "ok", "Hello there!")), st.text(max_size=30)),
    PERSONA_OR_NONE,
)


def assert_valid_shape(messages: list[ChatMessage]) -> None:
    """OpenAI chat messages, role by role; a system message first and never two in a row."""
    OPENAI_MESSAGES.validate_python(messages)
    roles = [m["role"] for m in messages]
    assert roles[0] == "system"
    assert all(pair != ("system", "system") for pair in pairwise(roles))


@settings(max_examples=300, deadline=None)
@given(
    recent=st.lists(past, max_size=14),
    card=st.sampled_from(BUILTIN_CARDS),
    limit=st.sampled_from((0, 1, 5, 400)),
)
def test_any_history_gives_a_valid_prompt_with_a_marker_before_every_new_voice(
    recent: list[PastMessage], card: PersonaCard, limit: int
) -> None:
    messages = build_prompt(card, recent, "hi", other_persona_chars=limit, others=OTHERS)
    assert_valid_shape(messages)
    assert messages[-2:] == [
        {"role": "user", "content": "hi"},
        {"role": "system", "content": card.post_history_instruction},
    ]
    voice = ""
    for message in messages[1:-1]:
        if message["role"] != "system":
            continue
        named = message["content"].split(". ", 1)[0].removeprefix("Persona switch: from ")
        old, new = named.split(" to ")
        assert old != new and (not voice or voice == old)
        voice = new
    voices = [m.persona for m in recent if m.role == "assistant" and m.persona and m.text.strip()]
    if voices and voices[-1] != card.id and limit:
        assert voice == card.name  # the last marker switches to the reply's persona
    for message in messages:
        if message["role"] == "assistant":
            assert any(message["content"] in (m.text, shorten(m.text, limit)) for m in recent), (
                message
            )


def test_prompt_with_switches_is_valid_for_the_openai_format() -> None:
    assert_valid_shape(
        build_prompt(CARING, SWITCHED, "Good night", other_persona_chars=40, others=OTHERS)
    )


# ---------------------------------------------------------------- real chat templates

FIXTURES = Path(__file__).parent / "fixtures"
GGUF = Path(
    os.environ.get("LLAMA_MODEL")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "persona-chat/llama/models/SmolLM2-135M-Instruct.Q4_1.gguf"
)
# A template in the style of those that take a system message only first and refuse two
# messages of one role in a row (Mistral's and Gemma's do); this test's own.
STRICT_TEMPLATE = """
{%- for message in messages %}
  {%- if message['role'] == 'system' and not loop.first %}
    {{- raise_exception('a system message is only allowed first') }}
  {%- endif %}
  {%- if not loop.first and message['role'] == messages[loop.index0 - 1]['role'] %}
    {{- raise_exception('two ' + message['role'] + ' messages in a row') }}
  {%- endif %}
  {{- '[' + message['role'] + '] ' + message['content'] + '\n' }}
{%- endfor %}"""


def smollm2_template() -> str:
    """SmolLM2's chat template as committed in the fixture, without the comment on top."""
    text = (FIXTURES / "smollm2_chat_template.jinja").read_text(encoding="utf-8")
    return text.split("-#}\n", 1)[1]


def raise_exception(message: str) -> NoReturn:
    raise TemplateError(message)


def render(template: str, messages: list[ChatMessage]) -> str:
    """What llama.cpp and transformers do with a chat template: jinja2, sandboxed."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    compiled = environment.from_string(template)
    return compiled.render(messages=messages, add_generation_prompt=True)


def test_smollm2_template_renders_the_markers_where_they_stand() -> None:
    messages = build_prompt(
        CARING, SWITCHED[4:], "Good night", other_persona_chars=40, others=OTHERS
    )
    assert render(smollm2_template(), messages) == (
        f"<|im_start|>system\n{persona_system_prompt(CARING)}<|im_end|>\n"
        "<|im_start|>user\nI feel tired<|im_end|>\n"
        "<|im_start|>assistant\nRest, dear. You have earned it.<|im_end|>\n"
        f"<|im_start|>system\n{note('Caring', WITTY)['content']}<|im_end|>\n"
        "<|im_start|>user\nThank you<|im_end|>\n"
        "<|im_start|>assistant\nGratitude, how refreshingly…<|im_end|>\n"
        f"<|im_start|>system\n{messages[-3]['content']}<|im_end|>\n"
        "<|im_start|>user\nGood night<|im_end|>\n"
        f"<|im_start|>system\n{CARING.post_history_instruction}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert messages[-3]["content"].startswith("Persona switch: from Witty to Caring.")


@pytest.mark.skipif(not GGUF.is_file(), reason=f"{GGUF} is not cached (build_llama_server.sh)")
def test_smollm2_template_fixture_is_the_one_in_the_gguf() -> None:
    field = GGUFReader(GGUF).fields["tokenizer.chat_template"]
    assert field.contents() == smollm2_template()


def test_strict_template_refuses_markers_as_system_messages() -> None:
    messages = build_prompt(CARING, SWITCHED, "Good night", others=OTHERS)
    with pytest.raises(TemplateError, match="a system message is only allowed first"):
        render(STRICT_TEMPLATE, messages)


def test_markers_folded_into_user_notes_pass_a_strict_template() -> None:
    messages = build_prompt(CARING, SWITCHED, "Good night", other_persona_chars=40, others=OTHERS)
    folded = notes_in_user_turns(messages)
    assert_valid_shape(folded)
    assert [m["role"] for m in folded] == ["system", *("user", "assistant") * 4, "user"]
    assert folded[3]["content"] == f"[{note('Friendly', WITTY)['content']}]\n\nAnd Mondays?"
    assert folded[-1]["content"] == (
        f"[{messages[-3]['content']}]\n\nGood night\n\n[{CARING.post_history_instruction}]"
    )
    rendered = render(STRICT_TEMPLATE, folded)
    assert rendered.count("[user] [Persona switch: from ") == 4
    assert messages == build_prompt(
        CARING, SWITCHED, "Good night", other_persona_chars=40, others=OTHERS
    )


def test_persona_no_longer_in_the_catalogue_is_named_by_its_id() -> None:
    recent = (
        PastMessage("user", "hi", "pirate"),
        PastMessage("assistant", "Arr!", "pirate"),
        PastMessage("user", "and now?", "retired"),
        PastMessage("assistant", "Gone.", "retired"),
    )
    marker = build_prompt(WITTY, recent, "hi")[3]["content"]
    assert marker == (
        "Persona switch: from pirate to retired. The replies before this point were written as"
        " pirate. From here on, speak only as retired, and do not continue pirate's tone."
    )
