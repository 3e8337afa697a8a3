"""Reply generators: the interface the session streams from, and the built-in template one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol

from protocol.cards import PersonaCard
from protocol.conversation.records import PastMessage
from protocol.frames import Usage
from server.render import Lookup, no_other, template_reply


@dataclass(frozen=True, slots=True)
class TurnContext:
    """What a generator gets for one reply: the persona, the recent messages, the user's text."""

    card: PersonaCard
    text: str
    recent: Sequence[PastMessage]  # oldest first; the current text is not among them
    others: Lookup = no_other  # the card of another persona of the catalogue (switch markers)
    avatar_name: str = ""  # what {{char}} stands for ("": the card's own name)
    user_name: str = ""  # what {{user}} stands for: the user's display name, or id


class GeneratorUnavailable(Exception):
    """The reply generator could not produce a reply (endpoint down, timeout, bad stream)."""


class ReplyGenerator(Protocol):
    """Streams the pieces of one reply; may yield one `Usage` when it knows token counts."""

    @property
    def reads_history(self) -> bool:
        """Whether `recent` must come from the database (else the session's own turns do)."""
        ...

    @property
    def streams(self) -> bool:
        """Whether replies stream (`render` gives None): a retried chat is then looked up in
        storage before anything is generated."""
        ...

    def render(self, turn: TurnContext) -> str | None:
        """The whole reply at once, when this generator has it without waiting (it then gets the
        session's own recent turns); else None, and the session streams it from `stream`,
        sending `reply_delta` frames."""
        ...

    def stream(self, turn: TurnContext) -> AsyncGenerator[str | Usage, None]: ...

    async def aclose(self) -> None: ...


def _template_pieces(turn: TurnContext) -> list[str]:
    return template_reply(turn.card, turn.text, turn.recent, turn.avatar_name, turn.user_name)


class TemplateGenerator:
    """Deterministic, offline replies from the persona card; microseconds per reply.

    With `delay_s` > 0 it pauses between pieces, like a model typing, which is how tests and
    demos exercise streaming and `cancel` without a model.
    """

    def __init__(self, delay_s: float = 0.0) -> None:
        self._delay_s = delay_s

    @property
    def reads_history(self) -> bool:
        return False

    @property
    def streams(self) -> bool:
        return self._delay_s > 0

    def render(self, turn: TurnContext) -> str | None:
        if self._delay_s:
            return None
        return "".join(_template_pieces(turn))

    async def stream(self, turn: TurnContext) -> AsyncGenerator[str | Usage, None]:
        pieces = _template_pieces(turn)
        for index, piece in enumerate(pieces):
            if index:
                await asyncio.sleep(self._delay_s)
            yield piece

    async def aclose(self) -> None:
        return None
