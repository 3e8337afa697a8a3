"""What the conversation asks its shell to do, in order: small frozen actions.

Each action that starts I/O names the input that reports its outcome back (see
`Conversation`): `LoadAvatar` → `avatar_loaded`/`avatar_failed`, `CommitSwitch` →
`switch_committed`/`switch_failed`, and so on. Keys tie an outcome to its action.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.conversation.records import PastMessage, Turn
from protocol.errors import CloseCode
from protocol.frames import ServerFrame


@dataclass(frozen=True, slots=True)
class Send:
    """Send a frame to the client: a model, or one already encoded."""

    frame: ServerFrame | bytes


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection with this code and reason."""

    code: CloseCode
    reason: str


@dataclass(frozen=True, slots=True)
class Authenticate:
    """Check the `hello`'s token, admit the user, open it in the store and read its avatar and
    its newest chat ids → `authenticated` or `refused`."""

    token: str


@dataclass(frozen=True, slots=True)
class LoadAvatar:
    """Read the user's avatar → `avatar_loaded` or `avatar_failed`."""


@dataclass(frozen=True, slots=True)
class CreateAvatar:
    """Insert the user's avatar → `avatar_created` or `avatar_failed`."""

    name: str
    personality: str


@dataclass(frozen=True, slots=True)
class CommitSwitch:
    """Commit a persona switch → `switch_committed` or `switch_failed` with the same key."""

    key: int
    personality: str


@dataclass(frozen=True, slots=True)
class Publish:
    """Tell the user's other sessions in this process of a switch this one committed (other
    processes learn of it from the database's notification)."""

    personality: str
    previous: str
    version: int


@dataclass(frozen=True, slots=True)
class ReadHistory:
    """Read a page of the user's messages → `history_read` or `history_failed`."""

    limit: int
    before: int | None


@dataclass(frozen=True, slots=True)
class Replay:
    """Look up the stored chat with this client id → `replay_found` or `replay_missing`."""

    key: int
    client_id: str


@dataclass(frozen=True, slots=True)
class StartReply:
    """Generate the reply to a chat → `reply_delta`* then `reply_ended` or `reply_failed`.

    `recent` is the conversation so far as this session saw it, for a generator that does not
    read the history from the database.
    """

    key: int
    persona: str
    text: str
    recent: tuple[PastMessage, ...]


@dataclass(frozen=True, slots=True)
class CancelReply:
    """Stop generating the reply in flight; it still ends with `reply_ended` (cancelled)."""

    key: int


@dataclass(frozen=True, slots=True)
class CommitTurn:
    """Write a chat and its reply → `turn_committed` or `turn_failed` with the same key."""

    key: int
    turn: Turn


@dataclass(frozen=True, slots=True)
class Release:
    """A chat id this session claimed is answered: it may be sent again (see `Claims`)."""

    client_id: str


Action = (
    Send
    | Close
    | Authenticate
    | LoadAvatar
    | CreateAvatar
    | CommitSwitch
    | Publish
    | ReadHistory
    | Replay
    | StartReply
    | CancelReply
    | CommitTurn
    | Release
)
