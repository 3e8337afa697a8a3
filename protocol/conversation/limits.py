"""Limits on what clients may spend: the per-connection token bucket behind `rate_limited`, and
the per-user byte budget of history pages."""

from __future__ import annotations

from enum import Enum


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up. Pure: the caller passes the time."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._last = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        elapsed = now - self._last
        self._last = now
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class Verdict(Enum):
    """What the frame limit says of one frame."""

    ALLOW = "allow"
    LIMIT = "limit"  # answer `rate_limited`
    CLOSE = "close"  # answer `rate_limited`, and close: the client keeps abusing the limit


class FrameLimit:
    """One connection's frame rate: a token bucket, and a close once `close_after` frames in a
    row were rate-limited (a frame let through starts the count again, so a client that is only
    a little too fast is slowed down, never closed). Pure: the caller passes the time."""

    __slots__ = ("_bucket", "_in_a_row", "close_after")

    def __init__(self, rate: float, burst: int, close_after: int, now: float) -> None:
        self._bucket = TokenBucket(rate, burst, now)
        self._in_a_row = 0
        self.close_after = close_after

    def check(self, now: float) -> Verdict:
        if self._bucket.take(now):
            self._in_a_row = 0
            return Verdict.ALLOW
        self._in_a_row += 1
        return Verdict.CLOSE if self._in_a_row >= self.close_after else Verdict.LIMIT


class ByteBudget:
    """A cost budget in bytes: `rate` a second, at most `burst` saved up. A request may start
    while the budget is above zero and is charged what it cost afterwards, so the balance can go
    below zero; then the next one waits until it has refilled. Pure: the caller passes the time."""

    __slots__ = ("_balance", "_last", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._balance = burst
        self._last = now

    def _refill(self, now: float) -> None:
        elapsed = now - self._last
        self._last = now
        if elapsed > 0:
            self._balance = min(self.burst, self._balance + elapsed * self.rate)

    def wait_s(self, now: float) -> float:
        """0 when a request may start now; else how long until it may."""
        self._refill(now)
        return 0.0 if self._balance > 0 else (1.0 - self._balance) / self.rate

    def spend(self, cost: float, now: float) -> None:
        self._refill(now)
        self._balance -= cost

    def full(self, now: float) -> bool:
        self._refill(now)
        return self._balance >= self.burst


class UserBudgets:
    """One ByteBudget per user, shared by all of the user's connections in this process. Full
    budgets are forgotten now and then, so the table holds only users who spent lately."""

    __slots__ = ("_budgets", "_sweep_at", "burst", "rate")

    SWEEP_EVERY = 1024  # users in the table between two sweeps of the full budgets

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._budgets: dict[str, ByteBudget] = {}
        self._sweep_at = self.SWEEP_EVERY

    def of(self, user_id: str, now: float) -> ByteBudget:
        budget = self._budgets.get(user_id)
        if budget is None:
            if len(self._budgets) >= self._sweep_at:
                self._sweep(now)
            budget = self._budgets[user_id] = ByteBudget(self.rate, self.burst, now)
        return budget

    def _sweep(self, now: float) -> None:
        self._budgets = {u: b for u, b in self._budgets.items() if not b.full(now)}
        self._sweep_at = len(self._budgets) + self.SWEEP_EVERY

    def __len__(self) -> int:
        return len(self._budgets)
