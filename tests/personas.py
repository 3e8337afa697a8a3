"""The built-in personas for tests, read from the migration that seeds them (they are data, not
code), and a way to fill a test database's catalogue with more."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import replace
from importlib import resources

import asyncpg
import orjson

from protocol.cards import ParsedCard, PersonaCard, parse_card, persona_card
from protocol.personas import Catalogue, Persona

SEED_MIGRATION = "004_personas.sql"


@functools.cache
def builtin_cards() -> tuple[ParsedCard, ...]:
    """The six built-in personas' cards, with their ids, as the migration seeds them."""
    sql = resources.files("server.migrations").joinpath(SEED_MIGRATION).read_text("utf-8")
    found = re.search(r"\$seed\$(.*?)\$seed\$", sql, re.DOTALL)
    assert found is not None, f"no $seed$ block in {SEED_MIGRATION}"
    return tuple(
        replace(parse_card(seed["card"]), id=seed["id"]) for seed in json.loads(found.group(1))
    )


BUILTIN_IDS: tuple[str, ...] = tuple(card.persona_id for card in builtin_cards())
CARDS: dict[str, PersonaCard] = {
    parsed.persona_id: persona_card(parsed) for parsed in builtin_cards()
}


BUILTIN_CARDS: tuple[PersonaCard, ...] = tuple(CARDS.values())


def get_card(persona_id: str) -> PersonaCard:
    return CARDS[persona_id]


def builtin_catalogue() -> Catalogue:
    """A process's catalogue holding the six built-ins at version 1, enabled."""
    return Catalogue(tuple(Persona(card, 1, True) for card in CARDS.values()))


def minimal_card(name: str, description: str = "") -> dict[str, object]:
    """A small V3 card of a persona named `name`."""
    return {
        "spec": "chara_card_v3",
        "spec_version": "3.0",
        "data": {"name": name, "description": description or f"{name}, a test persona."},
    }


async def add_personas(
    dsn: str, count: int, prefix: str = "extra", cards: list[dict[str, object]] | None = None
) -> list[str]:
    """Add `count` enabled personas (`{prefix}-0001`, ...; minimal cards unless `cards` are
    given) straight to the table, notified as an edit is, so that running servers load them
    too; returns their ids."""
    ids = [f"{prefix}-{index:04d}" for index in range(1, count + 1)]
    if cards is None:
        cards = [minimal_card(f"{prefix.title()} {index}") for index in range(1, count + 1)]
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO personas (id, name, description, spec, card)"
            " SELECT i, c->'data'->>'name', c->'data'->>'description', 'v3', c"
            " FROM unnest($1::text[], $2::json[]) AS t(i, c)",
            ids,
            [orjson.dumps(card).decode() for card in cards],
        )
        await conn.execute(
            "SELECT pg_notify('persona_catalogue', json_build_object("
            "'id', i, 'version', 1, 'removed', false)::text) FROM unnest($1::text[]) AS i",
            ids,
        )
    finally:
        await conn.close()
    return ids


async def remove_personas(dsn: str, ids: list[str]) -> None:
    """Remove personas a test added (none may be used by an avatar), notified as a removal."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DELETE FROM avatars WHERE personality = ANY($1::text[])", ids)
        await conn.execute("DELETE FROM personas WHERE id = ANY($1::text[])", ids)
        await conn.execute(
            "SELECT pg_notify('persona_catalogue', json_build_object("
            "'id', i, 'version', 1, 'removed', true)::text) FROM unnest($1::text[]) AS i",
            ids,
        )
    finally:
        await conn.close()
