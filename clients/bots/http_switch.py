"""A switch a bot makes through the HTTP API, from its PATCH until the bot may expect the new
persona: once it has both the 200 and the `persona_changed` on its own socket."""

from __future__ import annotations

from dataclasses import dataclass, field

from clients.bots.api import Answer

# What a PATCH refused for sure: nothing was switched. Any other failure (no answer, 5xx) may
# have switched all the same.
REFUSED = frozenset({400, 401, 404, 413, 422})


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
