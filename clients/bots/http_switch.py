"""Switches a bot makes through the HTTP API, each from its PATCH until the bot may expect the new
persona: once it has both the 200 and the `persona_changed` on its own socket."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from clients.bots.api import Answer, ApiLink
from clients.bots.net import retry_delay_s
from clients.bots.propagation import Propagation
from clients.bots.report import Stats

# What a PATCH refused for sure: nothing was switched. Any other failure (no answer, 5xx) may
# have switched all the same.
REFUSED = frozenset({400, 401, 404, 413, 422})
PUSH_GRACE_S = 0.5  # how long after its 200 a PATCH waits for its push once another came
MAX_RETRIES = 5


@dataclass(slots=True)
class HttpSwitch:
    """One PATCH in flight and what has come of it.

    Until it settles, a reply may carry the persona before it or the new one (the server may
    read a chat before or after the commit, and another process learns of it by NOTIFY). It
    settles when the 200 has come AND the bot's socket has the push: the session has the
    change then, and every chat sent after that must be rendered with it. Other pushes that
    came meanwhile count as well, as they do after a socket switch.
    """

    target: str
    before: set[str]
    sent_at: float
    answered_at: float | None = None
    pushed_at: float | None = None
    previous: str = ""  # what the 200 says the avatar had
    others: set[str] = field(default_factory=set)  # other personas pushed meanwhile
    failed: str = ""  # the error kind when the PATCH did not answer 200

    def on_push(self, personality: str, now: float) -> bool:
        """A `persona_changed` while in flight; True when it is this switch's own."""
        if personality == self.target and self.pushed_at is None:
            self.pushed_at = now
            return True
        self.others.add(personality)
        return False

    def on_answer(self, answer: Answer, now: float) -> None:
        if answer.status == 200 and answer.body.get("personality") == self.target:
            self.answered_at = now
            self.previous = str(answer.body.get("previous", ""))
        elif answer.status == 200:
            self.failed = "http_wrong_persona"
        else:
            self.failed = f"http_{answer.status or answer.error}"

    @property
    def settled(self) -> bool:
        return self.answered_at is not None and self.pushed_at is not None

    @property
    def latency_s(self) -> float:
        """From the PATCH to the later of its 200 and its push."""
        return max(self.answered_at or 0.0, self.pushed_at or 0.0) - self.sent_at

    def current_after(self) -> set[str]:
        """What the avatar may be once settled: the target, and what was pushed meanwhile."""
        return {self.target} | self.others

    def current_after_failure(self, status: int) -> set[str]:
        """What the avatar may be after a failed PATCH: without the target if it was refused
        for sure; with it if the outcome is unknown."""
        before = self.before | self.others
        return before if status in REFUSED else before | {self.target}


class HttpSwitcher:
    """One bot's switches through the HTTP API: whose turn it is, the PATCH in flight (at most
    one), and what the bot may expect once it settles, told to `expect`."""

    def __init__(
        self,
        bot: int,
        user: str,
        ratio: float,
        link: ApiLink,
        stats: Stats,
        propagation: Propagation | None,
        expect: Callable[[set[str]], None],
    ) -> None:
        self._bot = bot
        self._user = user
        self._ratio = ratio
        self._credit = (bot * ratio) % 1.0  # staggers the bots' turns
        self._link = link
        self._stats = stats
        self._propagation = propagation
        self._expect = expect
        self.switch: HttpSwitch | None = None
        self.task: asyncio.Task[Answer] | None = None

    def turn(self) -> bool:
        """Whether the next switch goes through the API: a share `ratio` of them."""
        if self._ratio <= 0:
            return False
        self._credit += self._ratio
        if self._credit < 1.0 - 1e-9:
            return False
        self._credit -= 1.0
        return True

    def start(self, target: str, current: set[str]) -> set[str]:
        """Send the PATCH (not waiting for it); returns what the avatar may be meanwhile."""
        self._stats.switches += 1
        self._stats.http_switches += 1
        self.switch = HttpSwitch(target, set(current), time.perf_counter())
        self.task = asyncio.create_task(self._patch(target))
        self.task.add_done_callback(self._answered)
        return current | {target}

    def on_push(self, personality: str, previous: str, now: float) -> None:
        """A `persona_changed` on the bot's socket (after the bot has widened what it expects)."""
        switch = self.switch
        own = switch is not None and switch.on_push(personality, now)
        if not own and self._propagation is not None:
            self._propagation.pushed(self._user, self._bot, personality, previous, now)
        if own:
            self._settle_if_done()

    def settled(self) -> bool:
        """Nothing in flight; or answered, with another change pushed meanwhile PUSH_GRACE_S
        ago (the PATCH's own push may never come: a session skips a change older than one it
        told)."""
        switch = self.switch
        if switch is None:
            return True
        answered = switch.answered_at
        return (
            bool(switch.others)
            and answered is not None
            and (time.perf_counter() > answered + PUSH_GRACE_S)
        )

    def give_up(self) -> None:
        """Settle what is in flight after waiting for it as long as the bot waits."""
        switch, self.switch = self.switch, None
        if switch is None:
            return
        if switch.answered_at is None:
            self._stats.error("http_timeout")
            self._expect(switch.current_after_failure(0))
            if self.task is not None:
                self.task.cancel()
            return
        if not switch.others:
            self._stats.error("http_no_push")
        self._expect(switch.current_after())

    async def close(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self._link.close()

    async def _patch(self, target: str) -> Answer:
        """The PATCH, sent again (with backoff) while it is answered 429: over the user's rate."""
        answer = await self._link.set_persona(target)
        for attempt in range(MAX_RETRIES):
            if answer.status != 429:
                break
            self._stats.http_retries += 1
            await asyncio.sleep(retry_delay_s(attempt, answer.retry_after))
            answer = await self._link.set_persona(target)
        return answer

    def _answered(self, task: asyncio.Task[Answer]) -> None:
        switch = self.switch
        if task.cancelled() or switch is None or task is not self.task:
            return
        answer, now = task.result(), time.perf_counter()
        switch.on_answer(answer, now)
        if switch.failed:
            self._stats.error(switch.failed)
            self.switch = None
            self._expect(switch.current_after_failure(answer.status))
            return
        self._stats.http_patch_s.append(now - switch.sent_at)
        if self._propagation is not None:
            self._propagation.switched(self._user, self._bot, switch.target, switch.previous, now)
        self._settle_if_done()

    def _settle_if_done(self) -> None:
        """Once the 200 and the push have both come, the new persona is what the bot expects."""
        switch = self.switch
        if switch is not None and switch.settled:
            self.switch = None
            self._stats.http_switch_s.append(switch.latency_s)
            self._expect(switch.current_after())
