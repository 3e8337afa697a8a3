"""Personas as the conversation sees them: the card a reply is rendered from, and the
catalogue of every process (which personas exist, which are enabled, at which version). The
catalogue itself is data in PostgreSQL (server/migrations/004_personas.sql, `run.py personas`);
this module keeps the rules: which id may be chosen, which edit is newer, what is listed."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from protocol.cards import PersonaCard, fill_macros
from protocol.errors import InvalidPersona, PersonaUnavailable
from protocol.frames import PersonaInfo

MAX_CHOICES_LISTED = 20  # an invalid_persona error lists this many ids, then "and N more"
LISTED_DESCRIPTION_CHARS = 200  # a listing's description: a card's can be pages long


def listed_description(card: PersonaCard) -> str:
    """A card's description as a listing shows it: macros filled in (the persona's name, and
    "you"), on one line, its first paragraph cut at a word within LISTED_DESCRIPTION_CHARS."""
    text = fill_macros(card.description, card.name, "you")
    text = " ".join(text.strip().split("\n\n", 1)[0].split())
    if len(text) <= LISTED_DESCRIPTION_CHARS:
        return text
    cut = text[: LISTED_DESCRIPTION_CHARS - 1].rsplit(" ", 1)[0].rstrip(",;:.")
    return cut + "…"


@dataclass(frozen=True, slots=True)
class Persona:
    """One persona of the catalogue at one version."""

    card: PersonaCard
    version: int
    enabled: bool

    @property
    def id(self) -> str:
        return self.card.id


class Catalogue:
    """A process's copy of the persona catalogue. Edits arrive as newer versions (`put`,
    `removed`); a notified edit not loaded yet leaves its persona `stale` until it is."""

    __slots__ = ("_listing", "_listing_json", "_personas", "_stale", "trusted")

    def __init__(self, personas: tuple[Persona, ...] = ()) -> None:
        self._personas: dict[str, Persona] = {persona.id: persona for persona in personas}
        self._stale: dict[str, int] = {}  # id -> the newest version notified, not loaded
        # what listings show, worked out again after each change (None: not yet)
        self._listing: tuple[PersonaInfo, ...] | None = None
        self._listing_json: bytes | None = None
        # False while this process may have missed edits (its listener was down): every
        # persona is then read again before a reply is rendered with it
        self.trusted = True

    def __len__(self) -> int:
        return len(self._personas)

    def __contains__(self, persona_id: object) -> bool:
        return persona_id in self._personas

    def ids(self) -> tuple[str, ...]:
        return tuple(self._personas)

    def put(self, persona: Persona) -> bool:
        """A persona as read from the database; False when an as new or newer one is here."""
        known = self._personas.get(persona.id)
        if self._stale.get(persona.id, 0) <= persona.version:
            self._stale.pop(persona.id, None)
        if known is not None and known.version >= persona.version:
            return False
        self._personas[persona.id] = persona
        self._changed()
        return True

    def removed(self, persona_id: str) -> None:
        """The persona was removed (its avatars reassigned in the same transaction)."""
        self._stale.pop(persona_id, None)
        if self._personas.pop(persona_id, None) is not None:
            self._changed()

    def _changed(self) -> None:
        self._listing = self._listing_json = None

    def notified(self, persona_id: str, version: int) -> bool:
        """An edit made `version`: whether it must be read (this copy is older)."""
        known = self._personas.get(persona_id)
        if known is not None and known.version >= version:
            return False
        self._stale[persona_id] = max(version, self._stale.get(persona_id, 0))
        return True

    def stale(self, persona_id: str) -> bool:
        """Whether an edit of the persona was notified and not read yet."""
        return persona_id in self._stale

    def fresh(self, persona_id: str) -> bool:
        """Whether a reply may be rendered from this copy of the persona without reading it."""
        return self.trusted and persona_id not in self._stale

    def get(self, persona_id: str) -> Persona | None:
        return self._personas.get(persona_id)

    def card(self, persona_id: str) -> PersonaCard:
        """The card to render a reply with: PersonaUnavailable for a disabled or removed one."""
        persona = self._personas.get(persona_id)
        if persona is None or not persona.enabled:
            raise PersonaUnavailable(
                f"the personality {persona_id!r} is not available now; choose another one",
                details={"personality": persona_id},
            )
        return persona.card

    def card_or_none(self, persona_id: str) -> PersonaCard | None:
        """A persona's card whether enabled or not (to name it in a prompt); None when gone."""
        persona = self._personas.get(persona_id)
        return None if persona is None else persona.card

    def listing_json(self) -> bytes:
        """`listing()` as a JSON array, encoded once per change of the catalogue."""
        if self._listing_json is None:
            listing = self.listing()
            self._listing_json = orjson.dumps([info.model_dump() for info in listing])
        return self._listing_json

    def listing(self) -> tuple[PersonaInfo, ...]:
        """The enabled personas (id, name, description), in catalogue order."""
        if self._listing is None:
            self._listing = tuple(
                PersonaInfo(id=p.id, name=p.card.name, description=listed_description(p.card))
                for p in self._personas.values()
                if p.enabled
            )
        return self._listing

    def require_enabled(self, personality: str) -> None:
        """InvalidPersona unless `personality` is an enabled persona; the error lists the
        choices, at most MAX_CHOICES_LISTED of them."""
        persona = self._personas.get(personality)
        if personality and persona is not None and persona.enabled:
            return
        ids = [info.id for info in self.listing()]
        shown, more = ids[:MAX_CHOICES_LISTED], len(ids) - MAX_CHOICES_LISTED
        choices = ", ".join(shown) + (f" and {more} more" if more > 0 else "")
        if not personality:
            message = f"name a personality, one of: {choices}"
        elif persona is not None:
            message = f"the personality {personality!r} is disabled; choose one of: {choices}"
        else:
            message = f"unknown personality {personality!r}; choose one of: {choices}"
        details: dict[str, object] = {"allowed": shown}
        if more > 0:
            details["more"] = more
        raise InvalidPersona(message, details=details)
