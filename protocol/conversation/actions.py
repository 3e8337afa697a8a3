"""What the conversation asks its shell to do, in order: small immutable actions (named tuples:
a few are made for every chat, and a tuple is made several times faster than a frozen
dataclass).

Each action that starts I/O names the input that reports its outcome back (see
`Conversation`): `LoadAvatar` → `avatar_loaded`/`avatar_failed`, `CommitSwitch` →
`switch_committed`/`switch_failed`, and so on. Keys tie an outcome to its action.
"""

from __future__ import annotations

from typing import NamedTuple

from protocol.conversation.records import PastMessage, Turn
from protocol.errors import CloseCode
from protocol.frames import ServerFrame


class Send(NamedTuple):
    """Send a frame to the client: a model, or one already encoded."""

    frame: ServerFrame | bytes


class Close(NamedTuple):
    """Close the connection with this code and reason."""

    code: CloseCode
    reason: str


class Authenticate(NamedTuple):
    """Check the `hello`'s token, admit the user, open it in the store and read its avatar and
    its newest chat ids → `authenticated` or `refused`."""

    token: str


class LoadAvatar(NamedTuple):
    """Read the user's avatar → `avatar_loaded` or `avatar_failed`."""


class CreateAvatar(NamedTuple):
    """Insert the user's avatar → `avatar_created` or `avatar_failed`."""

    name: str
    personality: str


class CommitSwitch(NamedTuple):
    """Commit a persona switch → `switch_committed` or `switch_failed` with the same key."""

    key: int
    personality: str


class Publish(NamedTuple):
    """Tell the user's other sessions in this process of a switch this one committed (other
    processes learn of it from the database's notification)."""

    personality: str
    previous: str
    version: int


class ReadHistory(NamedTuple):
    """Read a page of the user's messages → `history_read` or `history_failed`."""

    limit: int
    before: int | None


class Replay(NamedTuple):
    """Look up the stored chat with this client id → `replay_found` or `replay_missing`."""

    key: int
    client_id: str


class StartReply(NamedTuple):
    """Generate the reply to a chat → `reply_delta`* then `reply_ended` or `reply_failed`.

    `recent` is the conversation so far as this session saw it, for a generator that does not
    read the history from the database.
    """

    key: int
    persona: str
    text: str
    recent: tuple[PastMessage, ...]
    avatar_name: str = ""  # {{char}} in the card ("" before the avatar was seen)


class CancelReply(NamedTuple):
    """Stop generating the reply in flight; it still ends with `reply_ended` (cancelled)."""

    key: int


class CommitTurn(NamedTuple):
    """Write a chat and its reply → `turn_committed` or `turn_failed` with the same key."""

    key: int
    turn: Turn


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
)
