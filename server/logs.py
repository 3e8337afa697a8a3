"""Log helpers: warnings that repeat during an outage are logged in a measured way."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Kind:
    next_at: float = float("-inf")
    held: int = 0


class Throttled:
    """Logs each kind of warning at most once per `every_s`; the next line of a kind says how
    many of it were held back since the previous one. For what fails once per request during
    an outage: the log tells what happened and how often, without a line per request, and a
    new cause (another kind) is logged at once."""

    def __init__(
        self,
        logger: logging.Logger,
        every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._every_s = every_s
        self._clock = clock
        self._kinds: dict[str, _Kind] = {}

    def warning(self, kind: str, message: str, *args: object, exc_info: bool = False) -> None:
        now = self._clock()
        state = self._kinds.setdefault(kind, _Kind())
        if now < state.next_at:
            state.held += 1
            return
        if state.held:
            message += " (and %d more like it since the previous such line)"
            args = (*args, state.held)
        self._log.warning(message, *args, exc_info=exc_info)
        state.held = 0
        state.next_at = now + self._every_s


class OneLineError(logging.Filter):
    """Replaces a record's traceback with one line at the end of its message.

    For a library that logs an expected failure with its whole traceback: asyncpg's pool logs
    one (about 25 lines) every time it fails to reconnect while the database is down.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None:
            record.msg = f"{record.getMessage()} ({type(error).__name__}: {error})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True
