"""The personas: the six built-in cards the migration seeds, and the rules of a process's
catalogue (versions, stale copies, what is listed, what may be chosen)."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import pytest

from protocol.cards import PersonaCard
from protocol.errors import InvalidPersona, PersonaUnavailable
from protocol.personas import (
    LISTED_DESCRIPTION_CHARS,
    MAX_CHOICES_LISTED,
    Catalogue,
    Persona,
    listed_description,
)
from tests.personas import BUILTIN_CARDS, BUILTIN_IDS, builtin_catalogue, get_card


def test_the_migration_seeds_the_six_builtin_personas_in_order() -> None:
    assert BUILTIN_IDS == ("friendly", "playful", "caring", "witty", "professional", "romantic")


def test_every_card_is_complete() -> None:
    for card in BUILTIN_CARDS:
        assert card.name and card.description and card.system_prompt and card.greeting
        assert card.style_rules and card.example_lines and card.post_history_instruction
        assert card.openers and card.reflections and card.questions and card.wordless
        assert card.follow_ups and card.sign_off
        assert all(line.count("{topic}") == 1 for line in card.reflections + card.questions)
        assert not any("{" in line for line in card.wordless + card.openers + card.follow_ups)
        assert card.callback.count("{earlier}") == 1


def test_template_lines_quote_the_users_words() -> None:
    for card in BUILTIN_CARDS:
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
    for card in BUILTIN_CARDS:
        for line in template_lines(card):
            assert line[0].isupper() or line.startswith('"{'), (card.id, line)
            assert line.rstrip('"')[-1] in ".!?", (card.id, line)
            assert "  " not in line and line == line.strip(), (card.id, line)


def test_no_two_cards_share_a_line() -> None:
    seen: set[str] = set()
    for card in BUILTIN_CARDS:
        lines = set(template_lines(card))
        assert not lines & seen, card.id
        seen |= lines


def edited(card: PersonaCard, version: int, enabled: bool = True, **changes: Any) -> Persona:
    return Persona(replace(card, **changes), version, enabled)


def test_a_newer_version_replaces_a_persona_and_an_older_one_does_not() -> None:
    catalogue = builtin_catalogue()
    witty = get_card("witty")
    assert catalogue.put(edited(witty, 3, sign_off="Version three."))
    assert not catalogue.put(edited(witty, 2, sign_off="Version two."))
    assert not catalogue.put(edited(witty, 3, sign_off="Three again."))
    assert catalogue.card("witty").sign_off == "Version three."


def test_a_notified_edit_leaves_the_persona_stale_until_it_is_read() -> None:
    catalogue = builtin_catalogue()
    witty = get_card("witty")
    assert not catalogue.notified("witty", 1)  # the copy is that version already
    assert catalogue.notified("witty", 2) and not catalogue.fresh("witty")
    assert catalogue.fresh("friendly")  # the others are not touched
    catalogue.put(edited(witty, 2))
    assert catalogue.fresh("witty")
    assert catalogue.notified("witty", 4)
    catalogue.put(edited(witty, 3))  # read before the newest edit committed: still stale
    assert catalogue.stale("witty")
    catalogue.put(edited(witty, 4))
    assert catalogue.fresh("witty")


def test_a_removed_persona_is_gone_and_not_stale() -> None:
    catalogue = builtin_catalogue()
    catalogue.notified("witty", 2)
    catalogue.removed("witty")
    assert "witty" not in catalogue and catalogue.fresh("witty")
    assert "witty" not in [info.id for info in catalogue.listing()]
    with pytest.raises(PersonaUnavailable):
        catalogue.card("witty")
    assert catalogue.card_or_none("witty") is None


def test_an_untrusted_catalogue_has_no_fresh_persona() -> None:
    catalogue = builtin_catalogue()
    catalogue.trusted = False
    assert not any(catalogue.fresh(persona) for persona in BUILTIN_IDS)


def test_a_disabled_persona_is_not_listed_not_chosen_and_not_rendered() -> None:
    catalogue = builtin_catalogue()
    catalogue.put(edited(get_card("witty"), 2, enabled=False))
    assert [info.id for info in catalogue.listing()] == [
        "friendly",
        "playful",
        "caring",
        "professional",
        "romantic",
    ]
    with pytest.raises(InvalidPersona, match="disabled"):
        catalogue.require_enabled("witty")
    with pytest.raises(PersonaUnavailable) as unavailable:
        catalogue.card("witty")
    assert unavailable.value.code == "persona_unavailable" and unavailable.value.status == 409
    assert catalogue.card_or_none("witty") is not None  # still named in a prompt's markers


def test_require_enabled_lists_the_allowed_personas() -> None:
    catalogue = builtin_catalogue()
    catalogue.require_enabled("witty")
    for bad in ("", "Witty", "grumpy"):
        with pytest.raises(InvalidPersona) as refused:
            catalogue.require_enabled(bad)
        assert refused.value.details == {"allowed": list(BUILTIN_IDS)}
        assert ", ".join(BUILTIN_IDS) in refused.value.message


def test_the_list_of_choices_is_capped() -> None:
    base = get_card("friendly")
    many = tuple(
        Persona(replace(base, id=f"p{index:03d}", name=f"P {index}"), 1, True)
        for index in range(45)
    )
    catalogue = Catalogue(many)
    with pytest.raises(InvalidPersona) as refused:
        catalogue.require_enabled("grumpy")
    details = refused.value.details or {}
    assert details["allowed"] == [f"p{index:03d}" for index in range(MAX_CHOICES_LISTED)]
    assert details["more"] == 45 - MAX_CHOICES_LISTED
    assert refused.value.message.endswith("p019 and 25 more")


def test_the_listing_is_rebuilt_after_an_edit() -> None:
    catalogue = builtin_catalogue()
    before = catalogue.listing()
    assert catalogue.listing() is before  # kept between edits
    catalogue.put(edited(get_card("caring"), 2, description="Kind, and now edited."))
    after = {info.id: info.description for info in catalogue.listing()}
    assert after["caring"] == "Kind, and now edited."


def test_a_listing_shows_a_short_description_with_its_macros_filled_in() -> None:
    long = "{{char}} keeps the lighthouse and waits for {{user}}. " + "Waves. " * 100
    card = replace(get_card("caring"), name="Wren", description=long + "\n\nSecond paragraph.")
    listed = listed_description(card)
    assert listed.startswith("Wren keeps the lighthouse and waits for you. Waves.")
    assert len(listed) <= LISTED_DESCRIPTION_CHARS and listed.endswith("Waves…")
    assert listed_description(replace(card, description="Short.\n\nMore.")) == "Short."
