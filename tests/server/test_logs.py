"""Outage logging: the throttled warning (one line per interval and kind, and a count of what
it held back), and asyncpg's reconnect failures in one line each."""

from __future__ import annotations

import logging

import pytest

import run
from server.logs import Throttled


def test_a_burst_of_warnings_is_one_line_per_kind_then_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    throttled = Throttled(logging.getLogger("test.throttled"), every_s=5.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.throttled"):
        for _ in range(1000):
            throttled.warning("refused", "database unreachable: %s", "refused")
        throttled.warning("timeout", "database unreachable: %s", "timeout")  # a new cause
        now[0] += 5.0
        throttled.warning("refused", "database unreachable: %s", "refused")
        now[0] += 3600.0
        throttled.warning("refused", "database unreachable: %s", "refused")
    assert [record.getMessage() for record in caplog.records] == [
        "database unreachable: refused",
        "database unreachable: timeout",
        "database unreachable: refused (and 999 more like it since the previous such line)",
        "database unreachable: refused",
    ]


def test_the_pools_reconnect_failures_are_one_line_each(caplog: pytest.LogCaptureFixture) -> None:
    run.configure_logging("INFO")  # what `serve` sets up
    pool_log = logging.getLogger("asyncpg.pool")
    with caplog.at_level(logging.WARNING, logger="asyncpg.pool"):
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError:  # as asyncpg logs it while the database is down
            pool_log.warning("Failed to restore the pool connection floor; retrying", exc_info=True)
    assert "Traceback" not in caplog.text
    assert [record.getMessage() for record in caplog.records] == [
        "Failed to restore the pool connection floor; retrying"
        " (ConnectionRefusedError: [Errno 111] Connection refused)"
    ]
