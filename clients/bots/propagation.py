"""How long a switch takes to reach a user's other connections: from the moment the switching
bot has its answer (`persona_set`, or the PATCH's 200) to the moment each other connection of
that user in this run, on any instance, receives the matching `persona_changed`."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TypeVar

from clients.bots.report import Stats

T = TypeVar("T")
KEEP_S = 10.0  # a switch waits this long for its pushes, a push this long for its switch

Key = tuple[str, str, str]  # user, personality, previous


@dataclass(slots=True)
class _Switch:
    at: float
    waiting: set[int] = field(default_factory=set)  # bots that have not had the push yet


class Propagation:
    """Pairs each answered switch with the pushes it causes on the user's other connections.

    Pushes carry no version, so a push is matched by user, persona and previous persona to the
    latest such switch that still waits for that bot. A push may arrive before the switcher
    has its answer (the other connection is told at commit, as the answer is sent): it waits
    for its switch, and its time is then negative. A session may skip a push that an even
    newer change made old, so pushes not received are counted, not errors.
    """

    def __init__(self, stats: Stats) -> None:
        self._stats = stats
        self._members: dict[str, set[int]] = {}
        self._switches: dict[Key, list[_Switch]] = {}
        self._early: dict[Key, list[tuple[int, float]]] = {}  # pushes before their switch
        self._order: deque[tuple[float, Key]] = deque()  # for forgetting old entries

    def join(self, user: str, bot: int) -> None:
        """Bot `bot` of `user` is authenticated: it receives the user's pushes from now on."""
        self._members.setdefault(user, set()).add(bot)

    def leave(self, user: str, bot: int) -> None:
        members = self._members.get(user)
        if members is not None:
            members.discard(bot)

    def switched(self, user: str, bot: int, personality: str, previous: str, at: float) -> None:
        """Bot `bot` has the answer to its switch (committed from `previous` to `personality`)."""
        self._forget(at)
        others = self._members.get(user, set()) - {bot}
        if not others or personality == previous:
            return
        key = (user, personality, previous)
        self._stats.pushes_expected += len(others)
        switch = _Switch(at, others)
        early = self._early.get(key, [])
        for receiver, pushed_at in list(early):
            if receiver in switch.waiting:
                switch.waiting.discard(receiver)
                early.remove((receiver, pushed_at))
                self._stats.propagated(pushed_at - at)
        if switch.waiting:
            self._switches.setdefault(key, []).append(switch)
            self._order.append((at, key))

    def pushed(self, user: str, bot: int, personality: str, previous: str, at: float) -> None:
        """Bot `bot` of `user` received `persona_changed`."""
        self._forget(at)
        key = (user, personality, previous)
        for switch in reversed(self._switches.get(key, [])):
            if bot in switch.waiting:
                switch.waiting.discard(bot)
                self._stats.propagated(at - switch.at)
                return
        self._early.setdefault(key, []).append((bot, at))
        self._order.append((at, key))

    def _forget(self, now: float) -> None:
        order = self._order
        while order and order[0][0] < now - KEEP_S:
            _, key = order.popleft()
            cutoff = now - KEEP_S
            switches = [s for s in self._switches.get(key, []) if s.at >= cutoff and s.waiting]
            early = [e for e in self._early.get(key, []) if e[1] >= cutoff]
            _put(self._switches, key, switches)
            _put(self._early, key, early)


def _put(table: dict[Key, list[T]], key: Key, items: list[T]) -> None:
    if items:
        table[key] = items
    else:
        table.pop(key, None)
