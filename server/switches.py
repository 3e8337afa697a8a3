"""One session's persona switches on their way to the database, and who waits for them."""

from __future__ import annotations

import asyncio

from server.records import Switch

MAX_IN_FLIGHT = 4  # a session's switches not yet answered by the database; the next one waits


class SwitchesInFlight:
    """The switches a session handed to the group commit and has no answer for yet.

    The newest one decides the persona of the chats read behind it, until it is answered,
    unless another connection's change was notified meanwhile: which of the two commits last is
    not known until ours is answered, so then nothing decides and chats wait.
    """

    __slots__ = ("_contested", "_count", "_waiter", "newest")

    def __init__(self) -> None:
        self.newest: Switch | None = None
        self._count = 0
        self._contested = False
        self._waiter: asyncio.Future[None] | None = None

    def deciding(self) -> Switch | None:
        """The switch whose personality the next chat takes, if one does."""
        return None if self._contested else self.newest

    def contested(self) -> None:
        """Another connection's change arrived: if switches are in flight, none decides."""
        self._contested = self._count > 0

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
        if self._count:
            return
        self._contested = False
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def all_answered(self) -> None:
        """Wait until every switch started so far has its answer."""
        if self._count == 0:
            return
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._waiter)
