"""The rows the store reads and writes, as plain frozen dataclasses (no SQL here)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime

from protocol.errors import NoAvatar, ProtocolError, Unavailable
from protocol.frames import AvatarInfo, ReplyStatus


@dataclass(frozen=True, slots=True)
class Avatar:
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


@dataclass(frozen=True, slots=True)
class Turn:
    """One chat and its reply, written together in one statement or not at all."""

    user_id: str
    persona: str
    user_text: str
    reply_text: str
    status: str  # completed | cancelled | failed
    client_id: str | None = None
    message_id: int | None = None  # reserved ids, when the reply streamed before commit
    reply_id: int | None = None


@dataclass(frozen=True, slots=True)
class PastTurn:
    """A stored chat and its reply, found by the chat's client id."""

    message_id: int
    user_text: str
    reply_id: int
    persona: str
    reply_text: str
    status: ReplyStatus


@dataclass(slots=True, eq=False)
class Switch:
    """One persona switch to commit. Chats rendered with its personality before it was
    answered are written after it, and only if it committed."""

    user_id: str
    personality: str
    origin: str
    committed: bool = False  # set by the store once it has
    found: bool = True  # set False by the store when the user had no avatar to switch
    settled: asyncio.Future[None] | None = None  # done once the store has its answer

    def failure(self) -> ProtocolError | None:
        """Why a chat rendered after this answered switch is not written; None if it committed."""
        if self.committed:
            return None
        if not self.found:
            return NoAvatar()
        return Unavailable("the persona switch before this chat did not commit")


@dataclass(frozen=True, slots=True)
class SwitchResult:
    """A committed switch: the avatar as it committed, and the personality it replaced."""

    avatar: Avatar
    previous: str
    newest: bool  # no later switch of the same user was committed in the same batch


@dataclass(frozen=True, slots=True)
class StoredTurn:
    message_id: int
    reply_id: int
    inserted: bool  # False: a chat with the same client id was already stored
