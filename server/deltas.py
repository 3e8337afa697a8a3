"""A streamed reply's pieces, grouped into `reply_delta` frames."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class DeltaCoalescer:
    """Groups small pieces into `reply_delta` frames: at most one per `delay_s`, or at `chars`.

    A piece that comes when no frame went out for `delay_s` goes out at once (so the first
    token is never held back); pieces that follow sooner wait until `delay_s` after that frame.
    """

    __slots__ = ("_buffer", "_chars", "_delay_s", "_emit", "_last", "_loop", "_size", "_timer")

    def __init__(self, emit: Callable[[str], None], delay_s: float, chars: int) -> None:
        self._emit = emit
        self._delay_s = delay_s
        self._chars = chars
        self._buffer: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._last = float("-inf")
        self._loop = asyncio.get_running_loop()  # once: each call reads the process id (3.11)

    def add(self, piece: str) -> None:
        self._buffer.append(piece)
        self._size += len(piece)
        if self._size >= self._chars:
            self.flush()
        elif self._timer is None:
            due = self._last + self._delay_s
            if self._loop.time() >= due:
                self.flush()
            else:
                self._timer = self._loop.call_at(due, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._buffer:
            self._emit("".join(self._buffer))
            self._buffer.clear()
            self._size = 0
            self._last = self._loop.time()

    def close(self) -> None:
        """Stop; what is still buffered goes out in the final `reply`, which has the whole text."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._buffer.clear()
