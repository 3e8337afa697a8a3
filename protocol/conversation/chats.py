"""One conversation's chats: where each stands on its way to a reply, and the chat ids a process
is answering (a second chat with one of them is `busy`)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from protocol.conversation.avatar import PendingSwitch
from protocol.conversation.records import Turn
from protocol.errors import ProtocolError
from protocol.frames import Usage

KNOWN_IDS = 256  # chat ids of the user known to be stored, kept to find retries before a write


class Step(Enum):
    """Where the chat being answered stands."""

    QUEUED = "queued"  # waiting behind the chat being answered
    AFTER_SWITCH = "after_switch"  # waiting for the switch it was read behind to be answered
    LOOKUP = "lookup"  # a retry? its id is looked up in storage first
    GENERATING = "generating"
    COMMITTING = "committing"
    READ_BACK = "read_back"  # its id was stored meanwhile: the stored reply is read


@dataclass(slots=True, eq=False)
class PendingChat:
    """A chat on its way to a reply, with the persona it was accepted under."""

    key: int
    ref: str | None
    text: str
    persona: str
    received_at: float
    after: PendingSwitch | None  # the switch it was read behind, perhaps not answered yet
    step: Step = Step.QUEUED
    cancel_requested: bool = False
    interrupted: bool = False  # the connection went away: a cancelled reply is "interrupted"
    message_id: int | None = None  # reserved when the reply streams (deltas carry reply_id)
    reply_id: int | None = None
    turn: Turn | None = None  # what is being committed: the reply's text and how it ended
    failure: ProtocolError | None = None  # what ended a failed reply, sent once it is stored
    usage: Usage | None = None


class Claims:
    """The chat ids that chats of this process are being answered with, per user. Shared by the
    process's conversations; pure."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: set[tuple[str, str]] = set()

    def holds(self, user_id: str, ref: str) -> bool:
        return (user_id, ref) in self._held

    def claim(self, user_id: str, ref: str) -> None:
        self._held.add((user_id, ref))

    def release(self, user_id: str, ref: str) -> None:
        self._held.discard((user_id, ref))

    def __len__(self) -> int:
        return len(self._held)


class StoredIds:
    """Ids of the user's stored chats (the newest at `hello`, then this conversation's): a chat
    sent again with one of them is a retry, looked up instead of written (where it would fail
    its batch of writes, written again without it)."""

    __slots__ = ("_ids",)

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict.fromkeys(ids)

    def __contains__(self, ref: object) -> bool:
        return ref in self._ids

    def add(self, ref: str) -> None:
        self._ids[ref] = None
        if len(self._ids) > KNOWN_IDS:
            self._ids.popitem(last=False)
