"""Group commit: callers submit items one by one; one flush writes everything that queued up."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

C = TypeVar("C")
T = TypeVar("T")
R = TypeVar("R")

# How often one batch goes again after StaleResource: after a database restart every idle
# connection of the pool may be stale, and the pool hands them out one by one.
MAX_STALE_RETRIES = 3

# Called once per item with its result, or with the exception that failed it (or its batch).
Done = Callable[[R | None, BaseException | None], None]


class StaleResource(Exception):
    """Raised by a flush whose resource turned out dead before anything of the batch was sent
    (a database connection that its server had already ended): the batch is flushed again, once,
    on a fresh resource. `error` is what its callers get should that fail too."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _Flushed(enum.Enum):
    OK = "ok"
    FAILED = "failed"  # the batch got its exception; the next batch gets a fresh resource
    STALE = "stale"  # nothing was sent: the same batch again, on a fresh resource


class Batcher(Generic[C, T, R]):
    """Runs `flush` on batches of submitted items, one flush at a time.

    The first item starts a flush at once, so a lone caller waits one round trip. Items that
    arrive while a flush is in flight wait for it and then go together in the next one: under
    load, one database round trip serves many callers. One resource from `open` (a database
    connection) serves consecutive flushes for as long as items keep coming and `usable` says
    it still works (asked before each reuse: the database may have ended the connection while it
    sat between two flushes); a failed flush gets a fresh one for the next batch. A flush fails
    one item by returning an exception in its place, and the whole batch by raising; it raises
    `StaleResource` when nothing of the batch was sent, and the batch goes again on a fresh one.
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
        usable: Callable[[C], bool] | None = None,
    ) -> None:
        self._flush = flush
        self._open = open_resource
        self._usable = usable  # whether a held resource may serve one more flush
        self._before_batch = before_batch  # awaited before a batch is taken from the queue
        self._max_batch = max_batch
        self._name = name
        self._observe = observe
        self._pending: list[tuple[T, Done[R]]] = []
        self._runner: asyncio.Task[None] | None = None
        self._handed_out: asyncio.Future[None] | None = None  # see next_hand_out()
        self.flushes = 0
        self.items = 0
        self.retries = 0  # batches flushed again after a StaleResource

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
        retries = 0  # of `batch`, after StaleResource
        try:
            while batch or self._pending:
                if not batch:
                    batch, retries = await self._next_batch(), 0
                try:
                    async with self._open() as resource:
                        batch, retries = await self._flush_while_coming(resource, batch, retries)
                except Exception as exc:  # no resource for this batch, or its release failed
                    _finish(batch, exc)
                    batch = []
        except BaseException as exc:  # cancelled: nobody may be left waiting
            _finish(batch, exc)
            _finish(self._take_all(), exc)
            raise
        finally:
            self._runner = None
            # asked for while the runner was on its way out (releasing its resource): no
            # batch is coming, so whoever waits for one must not wait for nothing
            self._hand_out()

    async def _flush_while_coming(
        self, resource: C, batch: list[tuple[T, Done[R]]], retries: int
    ) -> tuple[list[tuple[T, Done[R]]], int]:
        """Flush `batch`, then the batches that queued meanwhile, on one `resource`; return the
        batch that needs a fresh resource (empty when none does) and its retries so far."""
        fresh = True
        while batch:
            if not fresh and self._usable is not None and not self._usable(resource):
                return batch, retries  # the database ended this connection between two flushes
            fresh = False
            may_retry = retries < MAX_STALE_RETRIES
            outcome = await self._flush_batch(resource, batch, may_retry)
            if outcome is _Flushed.STALE:
                return batch, retries + 1
            if outcome is _Flushed.FAILED:
                return [], 0
            batch, retries = ((await self._next_batch()) if self._pending else []), 0
        return [], 0

    async def _next_batch(self) -> list[tuple[T, Done[R]]]:
        if self._before_batch is not None:
            await self._before_batch()
        return self._take()

    def _take_all(self) -> list[tuple[T, Done[R]]]:
        batch, self._pending = self._pending, []
        return batch

    async def _flush_batch(
        self, resource: C, batch: list[tuple[T, Done[R]]], may_retry: bool
    ) -> _Flushed:
        """Flush one batch and hand out its results (or its failure)."""
        try:
            return await self._flush_and_hand_out(resource, batch, may_retry)
        finally:
            self._hand_out()

    def _hand_out(self) -> None:
        handed_out, self._handed_out = self._handed_out, None
        if handed_out is not None and not handed_out.done():
            handed_out.set_result(None)

    async def _flush_and_hand_out(
        self, resource: C, batch: list[tuple[T, Done[R]]], may_retry: bool
    ) -> _Flushed:
        self.flushes += 1
        self.items += len(batch)
        try:
            if self._observe is not None:
                self._observe(len(batch))
            results = await self._flush(resource, [item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self._name}: flush returned {len(results)} for {len(batch)}")
        except StaleResource as exc:
            if may_retry:
                self.retries += 1
                return _Flushed.STALE
            _finish(batch, exc.error)
            return _Flushed.FAILED
        except Exception as exc:
            _finish(batch, exc)
            return _Flushed.FAILED
        except BaseException as exc:
            _finish(batch, exc)
            raise
        for (_, done), result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                _call(done, None, result)
            else:
                _call(done, result, None)
        return _Flushed.OK


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
