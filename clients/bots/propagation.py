"""How long a switch takes to reach a user's other connections: from the moment the switching
bot has its answer (`persona_set`, or the PATCH's 200) to the moment each other connection of
that user in this run, on any instance, receives the matching `persona_changed`."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from clients.bots.report import Stats

WINDOW_S = 10.0  # a push this long after every switch of its kind matches none
EARLY_S = 1.0  # nor one this long before them (the answer leaves at the commit, as the push)
MAX_PUSHES = 2_000_000  # memory bound: later pushes are not timed

Key = tuple[str, str, str]  # user, personality, previous


@dataclass(slots=True)
class _Switches:
    """The answered switches of one key, in the order their answers came."""

    at: list[float] = field(default_factory=list)
    waiting: list[set[int]] = field(default_factory=list)  # bots that have not had the push


class Propagation:
    """Pairs each answered switch with the pushes it causes on the user's other connections.

    Pushes carry no version, so a push is matched by user, persona and previous persona, and
    among such switches still waiting for that bot to the one whose answer came nearest in
    time. That is done once the run is over (`finish`): a push often comes before the
    switcher has its answer (the other connection is told at commit, as the answer is sent),
    and its time is then negative. A session skips a push that a newer change made old, so
    pushes not received are counted, not errors. Runs that share users (one --run-id) see the
    other run's switches pushed too, unrecorded here: a push of the same change from one of
    those can be taken for one of ours, so across runs the figure is only indicative.
    """

    def __init__(self, stats: Stats) -> None:
        self._stats = stats
        self._members: dict[str, set[int]] = {}
        self._switches: dict[Key, _Switches] = {}
        self._pushes: list[tuple[Key, int, float]] = []

    def join(self, user: str, bot: int) -> None:
        """Bot `bot` of `user` is authenticated: it receives the user's pushes from now on."""
        self._members.setdefault(user, set()).add(bot)

    def leave(self, user: str, bot: int) -> None:
        members = self._members.get(user)
        if members is not None:
            members.discard(bot)

    def switched(self, user: str, bot: int, personality: str, previous: str, at: float) -> None:
        """Bot `bot` has the answer to its switch (committed from `previous` to `personality`)."""
        others = self._members.get(user, set()) - {bot}
        if not others or personality == previous:
            return
        self._stats.pushes_expected += len(others)
        switches = self._switches.setdefault((user, personality, previous), _Switches())
        switches.at.append(at)
        switches.waiting.append(others)

    def pushed(self, user: str, bot: int, personality: str, previous: str, at: float) -> None:
        """Bot `bot` of `user` received `persona_changed`."""
        if len(self._pushes) < MAX_PUSHES:
            self._pushes.append(((user, personality, previous), bot, at))

    def finish(self) -> None:
        """Match every push to its switch and time it (into the stats)."""
        for key, bot, at in self._pushes:
            switches = self._switches.get(key)
            if switches is None:
                continue
            index = _nearest_waiting(switches, bot, at)
            if index is not None:
                switches.waiting[index].discard(bot)
                self._stats.propagated(at - switches.at[index])
        self._pushes.clear()


def _nearest_waiting(switches: _Switches, bot: int, at: float) -> int | None:
    """The switch still waiting for `bot` whose answer came nearest to `at`: at most EARLY_S
    after the push, or WINDOW_S before it."""
    times, waiting = switches.at, switches.waiting
    right = bisect.bisect_left(times, at)
    left = right - 1
    while left >= 0 or right < len(times):
        before = at - times[left] if left >= 0 and at - times[left] <= WINDOW_S else math.inf
        after = (
            times[right] - at if right < len(times) and times[right] - at <= EARLY_S else math.inf
        )
        if before == after == math.inf:
            return None
        if before <= after:
            if bot in waiting[left]:
                return left
            left -= 1
        else:
            if bot in waiting[right]:
                return right
            right += 1
    return None
