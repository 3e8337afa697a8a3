"""The process's load, as its event loop's lag: samples in, whether new chats are shed out.

Pure: the shell's monitor (server/app.py) measures how late its timer fires and feeds the
lateness in with the time; conversations ask `shedding` before they take a new chat, and the
store asks `overloaded` when a database call has timed out (and says `strained` when the
database answered other calls meanwhile: the calls queue).
"""

from __future__ import annotations

import math

ENTER_SAMPLES = 2  # samples in a row at or over the threshold before shedding starts


class Load:
    """Whether the process sheds new chats, from its event loop's lag, with hysteresis.

    Shedding starts once `ENTER_SAMPLES` samples in a row lag by `lag_s` or more (so that one
    pause, a garbage collection say, does not start it), and stops once the lag has stayed
    under half of `lag_s` for `calm_s` (so that it does not flap). A database that answers
    some calls while others time out (`strained`) starts it at once. A `lag_s` of 0 never sheds.
    """

    __slots__ = (
        "_calm_since",
        "_due",
        "_lagged_at",
        "_over",
        "calm_s",
        "lag_s",
        "last_lag_s",
        "refused",
        "shedding",
        "window_s",
    )

    def __init__(self, lag_s: float, calm_s: float, window_s: float = 0.0) -> None:
        """`window_s`: how long a lag still explains a timeout (the database's timeout: a call
        that timed out now was waiting through the last `window_s`)."""
        self.lag_s = lag_s
        self.calm_s = calm_s
        self.window_s = window_s
        self.shedding = False
        self.last_lag_s = 0.0  # the newest sample
        self.refused = 0  # chats refused while shedding, ever
        self._over = 0  # samples in a row at or over `lag_s`
        self._calm_since: float | None = None  # when the lag went under half of `lag_s`
        self._due: float | None = None  # when the monitor's next sample is due
        self._lagged_at = -math.inf  # the newest sample at or over `lag_s`

    @property
    def retry_after_ms(self) -> int:
        """The delay a refused client is asked to wait before it tries again."""
        return math.ceil(max(self.calm_s, 0.5) * 1000)

    def sample(self, lag_s: float, now: float, next_due: float | None = None) -> bool:
        """A sample: the monitor's timer fired `lag_s` late at `now` (and fires next at
        `next_due`). True when shedding started or stopped."""
        self.last_lag_s = lag_s
        self._due = next_due
        if not self.lag_s:
            return False
        if lag_s >= self.lag_s:
            self._lagged_at = now
        if not self.shedding:
            self._over = self._over + 1 if lag_s >= self.lag_s else 0
            if self._over >= ENTER_SAMPLES:
                self.shedding = True
                self._over = 0
                self._calm_since = None
                return True
            return False
        if lag_s >= self.lag_s / 2:
            self._calm_since = None
            return False
        if self._calm_since is None:
            self._calm_since = now
        if now - self._calm_since >= self.calm_s:
            self.shedding = False
            self._calm_since = None
            return True
        return False

    def strained(self, now: float) -> bool:
        """A database call timed out at `now` while the database answered others: the work
        queues behind something out of capacity (a pool, the database's CPU), and more chats
        would only wait longer. Shedding starts at once and stops as after a lag. True when it
        started."""
        if not self.lag_s:
            return False
        started = not self.shedding
        self.shedding = True
        self._over = 0
        self._calm_since = None
        return started

    def lag_at(self, now: float) -> float:
        """The lag as of `now`: the newest sample's, or how late the next one already is."""
        late = now - self._due if self._due is not None else 0.0
        return max(self.last_lag_s, late)

    def overloaded(self, now: float) -> bool:
        """Whether a timeout met at `now` is explained by the process being out of CPU: its
        loop lags by the threshold now (a blocked loop gives its monitor no chance to sample),
        or it did within the last `window_s` (while the call waited). Shedding that a strained
        database started explains nothing by itself: a database that stopped answering would
        otherwise keep its timeouts `overloaded`."""
        if not self.lag_s:
            return False
        return self.lag_at(now) >= self.lag_s or now - self._lagged_at <= self.window_s

    def refuse(self) -> None:
        """Count a chat refused because the process sheds."""
        self.refused += 1
