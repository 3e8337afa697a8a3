"""The one place that decides what an exception from I/O becomes: a protocol error passes on as
it is (an outage was logged where it was met), a timeout that the process's load explains is
`overloaded`, anything else is a bug, logged with its traceback once and answered `internal`."""

from __future__ import annotations

import logging

from protocol.errors import Internal, ProtocolError
from server.store.connections import overloaded

log = logging.getLogger("server.session")


def as_protocol_error(exc: BaseException, session_id: str) -> ProtocolError:
    if isinstance(exc, ProtocolError):
        return exc
    if isinstance(exc, TimeoutError) and (overload := overloaded()) is not None:
        return overload
    log.error("session %s: unexpected error: %r", session_id, exc, exc_info=exc)
    return Internal()
