"""One session's persona switches on their way to the database, and who waits for them."""

from __future__ import annotations

import asyncio

from server.records import Switch

MAX_IN_FLIGHT = 4  # a session's switches not yet answered by the database; the next one waits


class SwitchesInFlight:
    """The switches a session handed to the group commit and has no answer for yet.

    The newest one decides the persona of the chats read behind it, until it is answered.
    """

    __slots__ = ("_count", "_waiter", "newest")

    def __init__(self) -> None:
        self.newest: Switch | None = None
        self._count = 0
        self._waiter: asyncio.Future[None] | None = None

    @property
    def full(self) -> bool:
        return self._count >= MAX_IN_FLIGHT

    def started(self, switch: Switch) -> None:
        self.newest = switch
        self._count += 1

    def answered(self, switch: Switch) -> None:
        """`switch` has its answer; wake whoever waits for all of them once none is left."""
        self._count -= 1
        if self.newest is switch:
            self.newest = None
        waiter = self._waiter
        if self._count == 0 and waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def all_answered(self) -> None:
        """Wait until every switch started so far has its answer."""
        if self._count == 0:
            return
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._waiter)
