"""Group commit: callers submit items one by one; one flush writes everything that queued up."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

C = TypeVar("C")
T = TypeVar("T")
R = TypeVar("R")

# Called once per item with its result, or with the exception that failed it (or its batch).
Done = Callable[[R | None, BaseException | None], None]


class Batcher(Generic[C, T, R]):
    """Runs `flush` on batches of submitted items, one flush at a time.

    The first item starts a flush at once, so a lone caller waits one round trip. Items that
    arrive while a flush is in flight wait for it and then go together in the next one: under
    load, one database round trip serves many callers. One resource from `open` (a database
    connection) serves consecutive flushes for as long as items keep coming; a failed flush
    gets a fresh one for the next batch. A flush fails one item by returning an exception in its
    place, and the whole batch by raising.
    """

    def __init__(
        self,
        flush: Callable[[C, Sequence[T]], Awaitable[Sequence[R | BaseException]]],
        open_resource: Callable[[], AbstractAsyncContextManager[C]],
        *,
        max_batch: int = 512,
        name: str = "batch",
        observe: Callable[[int], object] | None = None,
        before_batch: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._flush = flush
        self._open = open_resource
        self._before_batch = before_batch  # awaited before a batch is taken from the queue
        self._max_batch = max_batch
        self._name = name
        self._observe = observe
        self._pending: list[tuple[T, Done[R]]] = []
        self._runner: asyncio.Task[None] | None = None
        self._handed_out: asyncio.Future[None] | None = None  # see next_hand_out()
        self.flushes = 0
        self.items = 0

    async def submit(self, item: T) -> R:
        """Queue `item` and wait for its result."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self.add(item, settle(future))
        return await future

    def add(self, item: T, done: Done[R]) -> None:
        """Queue `item`; `done` gets its result (or the batch's exception) when it is flushed."""
        self._pending.append((item, done))
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name=f"{self._name}-flusher")

    def next_hand_out(self) -> asyncio.Future[None] | None:
        """While items are queued or being written: a future done once the next batch's
        results have been handed out; None when the batcher is idle."""
        if self._runner is None:
            return None
        if self._handed_out is None:
            self._handed_out = asyncio.get_running_loop().create_future()
        return self._handed_out

    async def drain(self) -> None:
        """Wait until every submitted item has been flushed."""
        while self._runner is not None:
            await asyncio.shield(self._runner)

    def _take(self) -> list[tuple[T, Done[R]]]:
        batch = self._pending[: self._max_batch]
        del self._pending[: self._max_batch]
        return batch

    async def _run(self) -> None:
        batch: list[tuple[T, Done[R]]] = []
        try:
            while self._pending:
                batch = await self._next_batch()
                try:
                    async with self._open() as resource:
                        while batch:
                            current, batch = batch, []
                            if not await self._flush_batch(resource, current):
                                break  # the next batch gets a fresh resource
                            if self._pending:
                                batch = await self._next_batch()
                except Exception as exc:  # no resource for this batch, or its release failed
                    _finish(batch, exc)
                    batch = []
        except BaseException as exc:  # cancelled: nobody may be left waiting
            _finish(batch, exc)
            _finish(self._take_all(), exc)
            raise
        finally:
            self._runner = None

    async def _next_batch(self) -> list[tuple[T, Done[R]]]:
        if self._before_batch is not None:
            await self._before_batch()
        return self._take()

    def _take_all(self) -> list[tuple[T, Done[R]]]:
        batch, self._pending = self._pending, []
        return batch

    async def _flush_batch(self, resource: C, batch: list[tuple[T, Done[R]]]) -> bool:
        """Flush one batch and hand out its results (or its failure); False when it failed."""
        try:
            return await self._flush_and_hand_out(resource, batch)
        finally:
            handed_out, self._handed_out = self._handed_out, None
            if handed_out is not None and not handed_out.done():
                handed_out.set_result(None)

    async def _flush_and_hand_out(self, resource: C, batch: list[tuple[T, Done[R]]]) -> bool:
        self.flushes += 1
        self.items += len(batch)
        try:
            if self._observe is not None:
                self._observe(len(batch))
            results = await self._flush(resource, [item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self._name}: flush returned {len(results)} for {len(batch)}")
        except Exception as exc:
            _finish(batch, exc)
            return False
        except BaseException as exc:
            _finish(batch, exc)
            raise
        for (_, done), result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                _call(done, None, result)
            else:
                _call(done, result, None)
        return True


def settle(future: asyncio.Future[R]) -> Done[R]:
    """A callback that hands an item's result, or its error, to `future`."""

    def done(result: R | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(result)  # type: ignore[arg-type]
        elif isinstance(error, asyncio.CancelledError):
            future.cancel()
        else:
            future.set_exception(error)

    return done


def _finish(batch: Sequence[tuple[T, Done[R]]], error: BaseException) -> None:
    for _, done in batch:
        _call(done, None, error)


def _call(done: Done[R], result: R | None, error: BaseException | None) -> None:
    """One caller's callback; a failing callback must not keep the rest of the batch waiting."""
    try:
        done(result, error)
    except Exception:
        log.exception("a batch callback failed")
