"""The throttled warning: one line per interval, and a count of what it held back."""

from __future__ import annotations

import logging

import pytest

from server.logs import Throttled


def test_a_burst_of_warnings_is_one_line_then_a_count(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    throttled = Throttled(logging.getLogger("test.throttled"), every_s=5.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.throttled"):
        for _ in range(1000):
            throttled.warning("database unreachable: %s", "refused")
        now[0] += 5.0
        throttled.warning("database unreachable: %s", "refused")
        now[0] += 60.0
        throttled.warning("database unreachable: %s", "refused")
    assert [record.getMessage() for record in caplog.records] == [
        "database unreachable: refused",
        "database unreachable: refused (and 999 more like it in the 5 s before)",
        "database unreachable: refused",
    ]
