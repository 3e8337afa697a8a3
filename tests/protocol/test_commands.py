"""In-conversation command parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.commands import (
    HELP_TEXT,
    ListPersonas,
    Message,
    ShowHelp,
    SwitchPersona,
    UnknownCommand,
    parse_chat_text,
)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("hello", Message("hello")),
        ("/persona playful", SwitchPersona("playful")),
        ("/persona   witty  ", SwitchPersona("witty")),
        ("/persona", SwitchPersona("")),
        ("/persona two words", SwitchPersona("two words")),
        ("/personas", ListPersonas()),
        ("/help", ShowHelp()),
        ("/dance now", UnknownCommand("dance")),
        ("/", UnknownCommand("")),
        ("/ persona x", UnknownCommand("")),
        ("//persona witty", Message("/persona witty")),
        ("//", Message("/")),
        (" /persona witty", Message(" /persona witty")),
    ],
)
def test_chat_text_is_classified(text: str, parsed: object) -> None:
    assert parse_chat_text(text) == parsed


def test_help_lists_every_command_and_points_to_the_personas() -> None:
    # the catalogue is data that changes: /personas lists it, the help does not
    for needle in ("/persona NAME", "/personas", "/help", "//", "see /personas"):
        assert needle in HELP_TEXT


@given(st.text(min_size=1, max_size=200))
def test_text_without_leading_slash_is_always_a_message(text: str) -> None:
    if not text.startswith("/"):
        assert parse_chat_text(text) == Message(text)


@given(st.text(max_size=200))
def test_double_slash_escape_drops_exactly_one_slash(rest: str) -> None:
    assert parse_chat_text("//" + rest) == Message("/" + rest)
