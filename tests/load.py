"""A small load of chatting, persona-switching clients that records what the server acknowledged."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from dataclasses import dataclass, field

from websockets.exceptions import ConnectionClosed

from server.auth import mint_token
from tests.client import Client
from tests.personas import BUILTIN_IDS


@dataclass(frozen=True, slots=True)
class AckedReply:
    user: str
    ref: str
    text: str
    message_id: int
    reply_id: int
    reply_text: str
    status: str


@dataclass
class Ledger:
    """What every client sent and what the server acknowledged."""

    replies: list[AckedReply] = field(default_factory=list)
    acked_persona: dict[str, str] = field(default_factory=dict)
    # switches sent after the last acknowledged one, per user (they may or may not have landed)
    unacked_personas: dict[str, list[str]] = field(default_factory=dict)
    switches_acked: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    closes: Counter[int] = field(default_factory=Counter)


async def chatter(
    url: str, secret: str, user: str, ledger: Ledger, stop: asyncio.Event, switch_every: int = 3
) -> None:
    """Chat (and switch persona every few chats) until `stop`, recording every answer."""
    client = Client(url)
    try:
        await client.__aenter__()
        await client.hello(mint_token(secret, user))
        if client.welcome["avatar"] is None:
            created = await client.request(
                {"type": "create_avatar", "name": "Load", "personality": "friendly"}
            )
            ledger.acked_persona[user] = created["avatar"]["personality"]
        else:
            ledger.acked_persona[user] = client.welcome["avatar"]["personality"]
        personas = itertools.cycle(BUILTIN_IDS)
        for turn in itertools.count(1):
            if stop.is_set():
                break
            if turn % switch_every == 0:
                await _switch(client, user, next(personas), ledger)
            await _chat(client, user, f"{user}-{turn}", f"message {turn} from {user}", ledger)
    except ConnectionClosed:
        ledger.closes[client.conn.close_code or 1006] += 1
    except (OSError, TimeoutError) as exc:
        ledger.errors[type(exc).__name__] += 1
    finally:
        await client.__aexit__(None, None, None)


async def _switch(client: Client, user: str, persona: str, ledger: Ledger) -> None:
    ledger.unacked_personas.setdefault(user, []).append(persona)
    answer = await client.request({"type": "set_persona", "personality": persona})
    if answer["type"] == "persona_set":
        ledger.acked_persona[user] = persona
        ledger.unacked_personas[user] = []
        ledger.switches_acked += 1
    else:
        ledger.errors[answer["code"]] += 1


async def _chat(client: Client, user: str, ref: str, text: str, ledger: Ledger) -> None:
    answer = await client.request({"type": "chat", "id": ref, "text": text}, timeout=30)
    if answer["type"] == "reply":
        ledger.replies.append(
            AckedReply(
                user,
                ref,
                text,
                answer["message_id"],
                answer["reply_id"],
                answer["text"],
                answer["status"],
            )
        )
    else:
        ledger.errors[answer["code"]] += 1
        await asyncio.sleep(0.01)  # as a real client would, rather than spin on errors
