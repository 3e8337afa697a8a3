"""The persona catalogue as data."""

from __future__ import annotations

import re

import pytest

from protocol.errors import InvalidPersona
from protocol.personas import (
    CATALOGUE,
    PERSONA_IDS,
    PersonaCard,
    get_card,
    is_known,
    require_known,
)


def test_catalogue_has_the_six_protocol_personas_in_order() -> None:
    assert PERSONA_IDS == ("friendly", "playful", "caring", "witty", "professional", "romantic")


def test_every_card_is_complete() -> None:
    for card in CATALOGUE:
        assert card.name and card.description and card.system_prompt and card.greeting
        assert card.style_rules and card.example_lines and card.post_history_instruction
        assert card.openers and card.reflections and card.questions and card.wordless
        assert card.follow_ups and card.sign_off
        assert all(line.count("{topic}") == 1 for line in card.reflections + card.questions)
        assert not any("{" in line for line in card.wordless + card.openers + card.follow_ups)
        assert card.callback.count("{earlier}") == 1


def test_template_lines_quote_the_users_words() -> None:
    for card in CATALOGUE:
        assert all('"{topic}"' in line for line in card.reflections), card.id
        for line in card.questions:  # the quoted question ends a sentence
            assert re.search(r'"\{topic\}\?"(?:$| [A-Z])', line), (card.id, line)
        assert '"{earlier}"' in card.callback, card.id


def template_lines(card: PersonaCard) -> tuple[str, ...]:
    return (
        *card.openers,
        *card.reflections,
        *card.questions,
        *card.wordless,
        *card.follow_ups,
        card.callback,
        card.sign_off,
    )


def test_every_template_line_is_whole_sentences() -> None:
    for card in CATALOGUE:
        for line in template_lines(card):
            assert line[0].isupper() or line.startswith('"{'), (card.id, line)
            assert line.rstrip('"')[-1] in ".!?", (card.id, line)
            assert "  " not in line and line == line.strip(), (card.id, line)


def test_no_two_cards_share_a_line() -> None:
    seen: set[str] = set()
    for card in CATALOGUE:
        lines = set(template_lines(card))
        assert not lines & seen, card.id
        seen |= lines


def test_unknown_personality_is_not_known() -> None:
    assert is_known("witty") and not is_known("Witty") and not is_known("grumpy")
    assert get_card("witty").name == "Witty"


def test_require_known_lists_the_allowed_personas() -> None:
    require_known("witty")
    for bad in ("", "Witty", "grumpy"):
        with pytest.raises(InvalidPersona) as refused:
            require_known(bad)
        assert refused.value.details == {"allowed": list(PERSONA_IDS)}
