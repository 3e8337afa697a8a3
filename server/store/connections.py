"""The store's connections: unreachable-database errors as `Unavailable`, pooled connections
without a reset, and rows as records."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from typing import Any, TypeAlias, TypeVar

import asyncpg

from protocol.conversation.records import Avatar
from protocol.errors import Unavailable
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


@contextmanager
def unreachable_is_unavailable(conn: Conn | None = None) -> Iterator[None]:
    """Errors that mean the database is not reachable become `Unavailable`; bugs stay bugs.

    When the database goes away under a statement, asyncpg can also answer with an
    `InternalClientError` about its protocol state; on `conn`, now closed, that is one more
    sign of the same thing.
    """
    try:
        yield
    except UNREACHABLE as exc:
        kind = type(exc).__name__
        _outage.warning(kind, "database unreachable: %s: %s", kind, exc)
        raise Unavailable("the database is unreachable; try again shortly") from exc
    except asyncpg.InternalClientError as exc:
        if conn is None or not conn.is_closed():
            raise
        # with its traceback: were it a bug in asyncpg rather than the database going away,
        # this is where it would show
        _outage.warning(
            "lost", "database connection lost under a statement: %s", exc, exc_info=True
        )
        raise Unavailable("the database is unreachable; try again shortly") from exc


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
