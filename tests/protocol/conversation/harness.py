"""A conversation under test, fed by hand: no event loop, no socket, no clock of its own."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson

from protocol.conversation.actions import Action, Send
from protocol.conversation.base import Terms
from protocol.conversation.chats import Claims
from protocol.conversation.core import Conversation
from protocol.conversation.limits import UserBudgets
from protocol.conversation.records import Avatar, StoredTurn, SwitchResult
from protocol.frames import Limits, encode
from tests.personas import builtin_catalogue

USER = "ann"
LIMITS = Limits(max_frame_bytes=65536, max_text_chars=4000, rate_per_s=20.0, rate_burst=40)
A = TypeVar("A")


class Counts:
    """A `Meter` that counts in a Counter."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()

    def frame(self, kind: str) -> None:
        self.seen[f"frame:{kind}"] += 1

    def error(self, code: str) -> None:
        self.seen[f"error:{code}"] += 1

    def reply(self, status: str, latency_s: float | None) -> None:
        self.seen[f"reply:{status}"] += 1

    def switch(self) -> None:
        self.seen["switch"] += 1


def terms(**changes: Any) -> Terms:
    values: dict[str, Any] = {
        "session_id": "s1",
        "server_version": "test",
        "catalogue": builtin_catalogue(),
        "limits": LIMITS,
        "abuse_close_after": 50,
        "chat_queue_depth": 8,
        "recent_messages": 12,
        "streams": False,
    }
    values.update(changes)
    return Terms(**values)


def avatar(personality: str = "friendly", version: int = 1) -> Avatar:
    when = datetime(2026, 12, 1, tzinfo=UTC)
    return Avatar(7, USER, "Ava", personality, version, when, when)


def switched(personality: str, previous: str, version: int, newest: bool = True) -> SwitchResult:
    return SwitchResult(avatar(personality, version), previous, newest)


def stored(message_id: int = 10, inserted: bool = True) -> StoredTurn:
    return StoredTurn(message_id, message_id + 1, inserted)


class Talk:
    """A conversation, its clock, and the claims and budgets of its process."""

    def __init__(
        self,
        claims: Claims | None = None,
        budgets: UserBudgets | None = None,
        trusted: bool = True,
        **changes: Any,
    ) -> None:
        self.now = 1000.0
        self.counts = Counts()
        self.claims = claims if claims is not None else Claims()
        self.budgets = budgets if budgets is not None else UserBudgets(1e9, 1e9)
        self.conv = Conversation(
            terms(**changes), self.counts, self.claims, self.budgets, self.now, trusted
        )

    def tick(self, seconds: float = 0.001) -> float:
        self.now += seconds
        return self.now

    def frame(self, **fields: Any) -> list[Action]:
        return self.conv.receive_text(orjson.dumps(fields).decode(), self.tick())

    def raw(self, text: str) -> list[Action]:
        return self.conv.receive_text(text, self.tick())

    def open(self, with_avatar: Avatar | None = None, ids: Iterable[str] = ()) -> list[Action]:
        """`hello` and its acceptance; returns what the acceptance put out."""
        self.frame(type="hello", id="h", token="a.token")
        return self.conv.authenticated(USER, with_avatar, ids)


def frames(actions: Sequence[Action]) -> list[dict[str, Any]]:
    """The frames sent, as the client reads them."""
    out = []
    for action in actions:
        if isinstance(action, Send):
            data = action.frame if isinstance(action.frame, bytes) else encode(action.frame)
            out.append(orjson.loads(data))
    return out


def kinds(actions: Sequence[Action]) -> list[str]:
    """Each action's class, and a sent frame's type: ["Send:reply", "CommitTurn", ...]."""
    names = []
    for action in actions:
        name = type(action).__name__
        if isinstance(action, Send):
            name += ":" + frames([action])[0]["type"]
        names.append(name)
    return names


def one(actions: Sequence[Action], kind: type[A]) -> A:
    found = [action for action in actions if isinstance(action, kind)]
    assert len(found) == 1, actions
    return found[0]
