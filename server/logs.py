"""Log helpers: a warning that may repeat many times a second is logged in a measured way."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class Throttled:
    """Logs a warning at most once per `every_s`; the next one it logs says how many it held
    back meanwhile. For what fails once per request during an outage: the log tells that it
    happened and how often, without a line per request."""

    def __init__(
        self,
        logger: logging.Logger,
        every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._every_s = every_s
        self._clock = clock
        self._next = float("-inf")
        self._held = 0
        self._last = 0.0

    def warning(self, message: str, *args: object) -> None:
        now = self._clock()
        if now < self._next:
            self._held += 1
            return
        if self._held:
            message += " (and %d more like it in the %.0f s before)"
            args = (*args, self._held, now - self._last)
        self._log.warning(message, *args)
        self._held = 0
        self._last = now
        self._next = now + self._every_s
