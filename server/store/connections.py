"""The store's connections: unreachable-database errors as `Unavailable` (a timeout while the
process is out of CPU as `Overloaded`), connections the database has ended, pooled connections
without a reset, and rows as records."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from typing import Any, TypeAlias, TypeVar

import asyncpg

from protocol.conversation.load import Load
from protocol.conversation.records import Avatar
from protocol.errors import Overloaded, Unavailable
from server.logs import Throttled

log = logging.getLogger("server.store")
_outage = Throttled(log)  # every request fails during an outage: a line per 5 s says so

# Errors that mean "the database is not reachable right now", as opposed to a bug.
UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)


Conn: TypeAlias = "asyncpg.pool.PoolConnectionProxy[Any]"

# The loads of the servers this process runs (one, but tests run several on one event loop,
# and then a lagging loop is every server's): a timeout they explain is not an outage.
_loads: list[Load] = []


class _Answers:
    """When a database call of this process last succeeded."""

    __slots__ = ("at",)

    def __init__(self) -> None:
        self.at = -math.inf


_answers = _Answers()


def watch_load(load: Load) -> None:
    """From now on, a database call that times out while `load` says the process is out of CPU
    (or while other calls were answered: the database is up, the calls queue) is `Overloaded`."""
    _loads.append(load)


def unwatch_load(load: Load) -> None:
    if load in _loads:
        _loads.remove(load)


def overloaded(started: float | None = None) -> Overloaded | None:
    """The error for a timeout met now, if the process's load explains it: its loop lags or
    lagged while the call waited, or (for a database call that began at `started`) the
    database answered another call of the process after this one began, so that it is up and
    what this call waited for was its turn. A call that began after the database stopped
    answering is not explained so: that is an outage."""
    now = time.monotonic()
    for load in _loads:
        queued = started is not None and _answers.at > started
        if queued and load.strained(now):
            _outage.warning(
                "strained",
                "overloaded: database calls time out while others are answered;"
                " new chats are refused",
            )
        if queued or load.overloaded(now):
            return Overloaded(
                "the server is overloaded and its database call timed out; try again after"
                " the delay in retry_after_ms",
                details={"retry_after_ms": load.retry_after_ms},
            )
    return None


@contextmanager
def unreachable_is_unavailable(conn: Conn | None = None) -> Iterator[None]:
    """Errors that mean the database is not reachable become `Unavailable`; bugs stay bugs.

    A statement on a connection that the database had already ended (see `ended_unsent`) is
    one more sign of the same thing, said in one line; any other `InternalClientError` on
    `conn`, now closed, is logged with its traceback, since it could be a bug in asyncpg.
    """
    started = time.monotonic()
    try:
        yield
        _answers.at = time.monotonic()
    except UNREACHABLE as exc:
        if isinstance(exc, TimeoutError) and (overload := overloaded(started)) is not None:
            _outage.warning("overloaded", "a database call timed out: the process is overloaded")
            raise overload from exc
        kind = type(exc).__name__
        _outage.warning(kind, "database unreachable: %s: %s", kind, exc)
        raise Unavailable("the database is unreachable; try again shortly") from exc
    except asyncpg.InternalClientError as exc:
        if conn is None or usable(conn):
            raise
        if ended_unsent(exc, conn):
            _outage.warning("lost", "database connection lost: the server had ended it")
        else:
            _outage.warning(
                "lost-under", "database connection lost under a statement: %s", exc, exc_info=True
            )
        raise Unavailable("the database is unreachable; try again shortly") from exc


def ended_unsent(exc: BaseException, conn: Conn) -> bool:
    """Whether `exc` says that a statement found `conn` already ended by the database, so that
    nothing of it was sent.

    When PostgreSQL ends a backend (its postmaster died, `pg_terminate_backend`, a shutdown),
    the backend sends a FATAL error and closes the socket. Arriving while the connection is
    idle, between two statements, that error puts asyncpg's protocol in its error-consuming
    state; a statement started before asyncpg has seen the socket close then fails at once,
    before any of it is written ("cannot switch to state 12; another operation (2) is in
    progress"), and asyncpg closes the connection. No statement of this server ever shares a
    connection with another, so this is the only way that message arises here.
    """
    return (
        isinstance(exc, asyncpg.InternalClientError)
        and "cannot switch to state" in str(exc)
        and usable(conn) is False
    )


def usable(conn: Conn) -> bool:
    """Whether a connection held across statements may serve one more: not closed, and not
    released to the pool (asyncpg does that to a held connection when its socket closes)."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:  # released back to the pool: its proxy is detached
        return False


class PoolConnection(asyncpg.Connection):
    """A pooled connection that needs no reset on release.

    The server sets no session state on pooled connections (no SET, no LISTEN, no cursors, and
    the migration lock is released explicitly), so asyncpg's reset query, one more round trip
    every time a connection goes back to the pool, would only cost time.
    """

    def get_reset_query(self) -> str:
        return ""


R = TypeVar("R")


def record(cls: type[R], row: asyncpg.Record) -> R:
    """A dataclass from the columns of `row` that share its field names."""
    return cls(**{name: row[name] for name in field_names(cls)})  # type: ignore[arg-type]


@functools.cache
def field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def avatar_or_none(row: asyncpg.Record | None) -> Avatar | None:
    return None if row is None else record(Avatar, row)
