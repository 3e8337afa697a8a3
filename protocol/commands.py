"""In-conversation commands: turns the text of a `chat` into a message or a command."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Message:
    """Ordinary text for the reply generator."""

    text: str


@dataclass(frozen=True, slots=True)
class SwitchPersona:
    """`/persona NAME`; `name` is empty when no name was given."""

    name: str


@dataclass(frozen=True, slots=True)
class ListPersonas:
    """`/personas`."""


@dataclass(frozen=True, slots=True)
class ShowHelp:
    """`/help`."""


@dataclass(frozen=True, slots=True)
class UnknownCommand:
    """Any other `/word`."""

    word: str


Parsed = Message | SwitchPersona | ListPersonas | ShowHelp | UnknownCommand

HELP_TEXT = "\n".join(
    (
        "Commands:",
        "/persona NAME  switch the avatar's personality (see /personas)",
        "/personas      list the personalities",
        "/help          show this help",
        "//text         send text that starts with '/'",
    )
)


def parse_chat_text(text: str) -> Parsed:
    """Classify a chat text. Pure: no I/O, no state."""
    if not text.startswith("/"):
        return Message(text)
    if text.startswith("//"):
        return Message(text[1:])
    body = text[1:]
    if not body or body[0].isspace():
        return UnknownCommand("")
    parts = body.split(maxsplit=1)
    word = parts[0]
    argument = parts[1].strip() if len(parts) > 1 else ""
    if word == "persona":
        return SwitchPersona(argument)
    if word == "personas":
        return ListPersonas()
    if word == "help":
        return ShowHelp()
    return UnknownCommand(word)
