"""How a bot reads its connection: bounded in frames and in time, every frame handled (and
timed) the moment it arrives, and the PATCH in flight awaited beside it."""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from clients.bots.http_switch import HttpSwitcher
from clients.bots.plan import BotPlan
from clients.bots.report import Stats
from clients.link import BadFrame, Frame, Link

MAX_FRAMES_PER_ANSWER = 10_000
POLL_S = 0.05  # how often a wait for a switch to settle looks at the clock


class BotFailed(Exception):
    """The bot cannot go on (timeout, protocol breach); already counted by kind."""


class Reading(ABC):
    """The reads of a bot (the base of Bot, which handles each frame in `_on_frame`)."""

    _link: Link | None
    _plan: BotPlan
    _stats: Stats
    _http: HttpSwitcher | None

    @abstractmethod
    def _on_frame(self, frame: dict[str, Any]) -> str | None:
        """Check one frame; return the ref it answered (None for pushes and deltas)."""

    def _fail(self, kind: str) -> BotFailed:
        self._stats.error(kind)
        return BotFailed(kind)

    async def _recv(self, deadline: float) -> Frame:
        link = self._link
        assert link is not None, "connect() first"
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            raise self._fail("timeout")
        try:
            return await link.recv(remaining)
        except TimeoutError:
            raise self._fail("timeout") from None
        except BadFrame as exc:
            raise self._fail(exc.kind) from None

    async def _pause(self, seconds: float) -> None:
        """Wait, handling frames as they come, so that answers are timed when they arrive."""
        link = self._link
        assert link is not None, "connect() first"
        until = time.perf_counter() + seconds
        for _ in range(MAX_FRAMES_PER_ANSWER):
            remaining = until - time.perf_counter()
            if remaining <= 0:
                return
            try:
                frame = await link.recv(remaining)
            except TimeoutError:
                return
            except BadFrame as exc:
                raise self._fail(exc.kind) from None
            self._on_frame(frame)

    async def _read_until(self, done: Callable[[], bool]) -> bool:
        """Handle frames (and the API's answer) until `done()`; False if the answer timeout
        passes first."""
        deadline = time.perf_counter() + self._plan.answer_timeout_s
        for _ in range(MAX_FRAMES_PER_ANSWER):
            if done():
                return True
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return False
            await self._next_event(min(remaining, POLL_S))
        raise self._fail("too_many_frames")

    async def _next_event(self, timeout: float) -> None:
        """Handle the next frame, or return when the PATCH in flight is answered or `timeout`
        passes (cancelling a read loses no frame)."""
        link = self._link
        assert link is not None, "connect() first"
        recv = asyncio.ensure_future(link.recv(timeout))
        patch = self._http.task if self._http is not None else None
        waiting: set[asyncio.Future[Any]] = {recv}
        if patch is not None and not patch.done():
            waiting.add(patch)
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not recv.done():
            recv.cancel()
        try:
            frame = await recv
        except TimeoutError:
            return
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return
        except BadFrame as exc:
            raise self._fail(exc.kind) from None
        self._on_frame(frame)

    async def _await_answer(self, ref: str) -> dict[str, Any]:
        """Read (bounded in frames and time) until `ref` is answered; handle all else on the way."""
        deadline = time.perf_counter() + self._plan.answer_timeout_s
        for _ in range(MAX_FRAMES_PER_ANSWER):
            frame = await self._recv(deadline)
            if self._on_frame(frame) == ref:
                return frame
        raise self._fail("too_many_frames")
