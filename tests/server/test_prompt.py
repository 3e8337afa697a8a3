"""The LLM prompt as a pure function: exactly what the model receives for a persona and history."""

from __future__ import annotations

from protocol.conversation.records import PastMessage
from protocol.personas import CATALOGUE, get_card
from server.render import build_prompt, persona_system_prompt

FRIENDLY = get_card("friendly")
WITTY = get_card("witty")
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


def test_system_prompt_holds_description_style_rules_and_example_lines() -> None:
    prompt = persona_system_prompt(FRIENDLY)
    assert f"About you: {FRIENDLY.description}" in prompt
    for line in (*FRIENDLY.style_rules, *FRIENDLY.example_lines):
        assert f"- {line}\n" in prompt + "\n"


def test_every_persona_gets_its_own_system_prompt() -> None:
    prompts = {persona_system_prompt(card) for card in CATALOGUE}
    assert len(prompts) == len(CATALOGUE)


def test_post_history_instruction_is_the_last_message() -> None:
    for card in CATALOGUE:
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
