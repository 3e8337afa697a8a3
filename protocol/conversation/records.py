"""What the conversation and its shell hand each other: rows as the store reads and writes them,
as plain frozen dataclasses (no SQL, no I/O); the two made for every chat are named tuples,
which cost a fifth of a frozen dataclass to make."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal, NamedTuple

from protocol.frames import AvatarInfo, ReplyStatus

Role = Literal["user", "assistant"]


@dataclass(frozen=True, slots=True)
class Avatar:
    """The user's avatar row; `version` goes up by one with every persona change."""

    id: int
    user_id: str
    name: str
    personality: str
    version: int
    created_at: datetime
    updated_at: datetime

    def info(self) -> AvatarInfo:
        return AvatarInfo(
            id=self.id,
            name=self.name,
            personality=self.personality,
            created_at=self.created_at,
            updated_at=self.updated_at,
        )


class PastMessage(NamedTuple):
    """One earlier message of the conversation, as a generator sees it: `persona` is the one
    the chat was rendered with ("" when unknown)."""

    role: Role
    text: str
    persona: str = ""


@dataclass(slots=True)
class Turn:
    """One chat and its reply, written together in one statement or not at all. Not frozen,
    though nothing changes it: one is made for every chat, and a frozen dataclass's `__init__`
    costs seven times as much."""

    user_id: str
    persona: str
    user_text: str
    reply_text: str
    status: ReplyStatus
    client_id: str | None = None
    message_id: int | None = None  # reserved ids, when the reply streamed before commit
    reply_id: int | None = None
    error_code: str | None = None  # a failed reply's error, as the client was answered


class StoredTurn(NamedTuple):
    message_id: int
    reply_id: int
    inserted: bool  # False: a chat with the same client id was already stored


@dataclass(frozen=True, slots=True)
class PastTurn:
    """A stored chat and its reply, found by the chat's client id."""

    message_id: int
    user_text: str
    reply_id: int
    persona: str
    reply_text: str
    status: ReplyStatus


@dataclass(frozen=True, slots=True)
class SwitchRequest:
    """One persona switch for the store to commit (`origin`: the process that made it)."""

    user_id: str
    personality: str
    origin: str


@dataclass(frozen=True, slots=True)
class SwitchResult:
    """A committed switch: the avatar as it committed, and the personality it replaced."""

    avatar: Avatar
    previous: str
    newest: bool  # no later switch of the same user was committed in the same batch
