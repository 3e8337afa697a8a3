"""What every part of the conversation shares: its phase, what frames wait for, the terms its
process sets, where it counts, and how it puts out actions."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from protocol.conversation.actions import Action, Close, Send
from protocol.errors import CloseCode, ProtocolError
from protocol.frames import Limits, ServerFrame, error_frame
from protocol.personas import Catalogue


class Phase(Enum):
    AWAITING_HELLO = "awaiting_hello"
    OPEN = "open"
    DRAINING = "draining"  # new chats are refused; those accepted are answered
    CLOSED = "closed"


class Wait(Enum):
    """What the frame being handled waits for before the frames behind it are read."""

    NOTHING = "nothing"
    HELLO = "hello"  # the token's check and the user's avatar
    SWITCHES = "switches"  # every switch in flight to be answered
    AVATAR = "avatar"  # a read of the avatar
    CREATE = "create"  # the avatar being created
    HISTORY = "history"  # a page of history


class Meter(Protocol):
    """Where the conversation counts what happened (the shell's metrics)."""

    def frame(self, kind: str) -> None: ...

    def error(self, code: str) -> None: ...

    def reply(self, status: str, latency_s: float | None) -> None: ...

    def switch(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Terms:
    """What a conversation is told by its process."""

    session_id: str
    server_version: str
    catalogue: Catalogue  # the process's copy, kept current by its shell
    limits: Limits
    abuse_close_after: int
    chat_queue_depth: int
    recent_messages: int  # messages of its own a conversation keeps for the generator
    streams: bool  # replies stream (so a retried id is looked up before generating)


class Outputs:
    """The actions an input puts out, in order; nothing is sent once the conversation is
    closed."""

    phase: Phase
    _meter: Meter

    def __init__(self) -> None:
        self._out: list[Action] = []

    def _send(self, frame: ServerFrame | bytes) -> None:
        if self.phase is not Phase.CLOSED:
            self._out.append(Send(frame))

    def _error(self, exc: ProtocolError, ref: str | None) -> None:
        frame = error_frame(exc, ref)
        self._meter.error(frame.code)
        self._send(frame)

    def _close(self, code: CloseCode, reason: str) -> None:
        if self.phase is not Phase.CLOSED:
            self._out.append(Close(code, reason))
            self.phase = Phase.CLOSED  # what came in behind it is not read

    def _take(self) -> list[Action]:
        out, self._out = self._out, []
        return out
