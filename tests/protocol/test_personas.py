"""The persona catalogue as data."""

from __future__ import annotations

import pytest

from protocol.errors import InvalidPersona
from protocol.personas import CATALOGUE, PERSONA_IDS, get_card, is_known, require_known


def test_catalogue_has_the_six_protocol_personas_in_order() -> None:
    assert PERSONA_IDS == ("friendly", "playful", "caring", "witty", "professional", "romantic")


def test_every_card_is_complete() -> None:
    for card in CATALOGUE:
        assert card.name and card.description and card.system_prompt and card.greeting
        assert card.style_rules and card.example_lines and card.post_history_instruction
        assert all("{topic}" in line for line in card.reflections)
        assert "{earlier}" in card.callback


def test_no_two_cards_share_a_line() -> None:
    seen: set[str] = set()
    for card in CATALOGUE:
        lines = {*card.openers, *card.reflections, *card.follow_ups, card.sign_off}
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
