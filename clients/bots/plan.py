"""What the bots of a run share: the plan, the run's clock, pending frames and the pacer."""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field


class Mode(enum.Enum):
    """PROTOCOL speaks PROTOCOL.md; ECHO drives a bare echo server with the same chat frames."""

    PROTOCOL = "protocol"
    ECHO = "echo"


@dataclass(frozen=True, slots=True)
class BotPlan:
    """What every bot of one run does."""

    url: str
    mode: Mode = Mode.PROTOCOL
    switch_every: int = 5
    invalid_every: int = 4  # every N-th switch is preceded by an invalid one; 0: never
    think_s: float = 0.0
    chat: bool = True  # False: authenticate, hold the connection idle, ping at the end
    answer_timeout_s: float = 30.0
    open_timeout_s: float = 30.0
    max_chats: int = 1_000_000
    http_switch_ratio: float = 0.0  # this share of the switches goes through the HTTP API


@dataclass(slots=True)
class Pending:
    """A frame sent and not yet answered."""

    kind: str  # hello, create, chat, switch, invalid, ping
    sent_at: float
    expect: str = ""  # the personality a switch asks for
    before: set[str] = field(default_factory=set)  # a switch: the personas current before it
    pushed: bool = False  # a switch: another connection's change was pushed while it was pending
    accept: set[str] = field(default_factory=set)  # personas a chat's reply may carry
    after_switch: bool = False  # a chat sent right behind a switch, before its acknowledgement


class Phase:
    """The run's clock, shared by its bots: the go signal and the end of the chat window."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.deadline = 0.0

    def start(self, duration_s: float) -> None:
        self.deadline = time.perf_counter() + duration_s
        self.go.set()

    def running(self) -> bool:
        return time.perf_counter() < self.deadline


class Pacer:
    """A client-side token bucket, so closed-loop bots stay under the server's rate limit."""

    def __init__(self, rate: float, burst: float) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._last = time.perf_counter()

    def take(self) -> float:
        """Spend one token; return how long to wait before sending (0.0: at once)."""
        now = time.perf_counter()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate) - 1.0
        self._last = now
        return 0.0 if self._tokens >= 0.0 else -self._tokens / self._rate
