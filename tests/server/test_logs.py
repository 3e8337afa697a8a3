"""The throttled warning: one line per interval and kind, and a count of what it held back."""

from __future__ import annotations

import logging

import pytest

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
