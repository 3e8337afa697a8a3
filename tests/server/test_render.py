"""The template reply: deterministic, persona-styled, and readable."""

from __future__ import annotations

from protocol.personas import CATALOGUE, get_card
from server.render import PastMessage, template_reply, topic_of


def test_same_input_gives_the_same_reply() -> None:
    card = get_card("playful")
    assert template_reply(card, "rainy day", []) == template_reply(card, "rainy day", [])


def test_every_persona_answers_the_same_text_differently() -> None:
    replies = {"".join(template_reply(card, "I lost my keys", [])) for card in CATALOGUE}
    assert len(replies) == len(CATALOGUE)


def test_topic_is_lower_cased_mid_sentence_and_capitalised_at_the_start() -> None:
    for card in CATALOGUE:
        reflection = template_reply(card, "It rained all day", [])[1]
        if reflection.startswith("It rained all day"):
            continue
        assert "it rained all day" in reflection, (card.id, reflection)


def test_pronoun_i_and_acronyms_keep_their_case() -> None:
    witty = get_card("witty")
    assert "I" in "".join(template_reply(witty, "I baked bread", []))
    assert "NASA" in "".join(template_reply(witty, "NASA called me", []))


def test_reply_recalls_the_last_user_message() -> None:
    recent = [PastMessage("user", "my cat is Miso"), PastMessage("assistant", "nice")]
    assert "my cat is Miso" in "".join(template_reply(get_card("caring"), "hello", recent))


def test_topic_keeps_words_and_drops_symbols() -> None:
    assert topic_of("  Hello,   world!!! ") == "Hello world"
    assert topic_of("!!!") == "that"
