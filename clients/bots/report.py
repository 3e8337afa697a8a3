"""The bots' counters and latencies, and the report made of them: live table, final table, JSON."""

from __future__ import annotations

import math
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from rich.console import Group
from rich.table import Table

PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 50.0),
    ("p90", 90.0),
    ("p99", 99.0),
    ("p99_9", 99.9),
)
MAX_EXAMPLES = 10


@dataclass(slots=True)
class Stats:
    """Everything the bots of one run count. One event loop writes it; no locking needed."""

    connected: int = 0
    peak_connected: int = 0
    ready: int = 0
    chats_sent: int = 0
    replies: int = 0
    replies_in_window: int = 0
    switches: int = 0
    switch_acks: int = 0
    invalid_sent: int = 0
    invalid_rejected: int = 0
    stale: int = 0
    pongs: int = 0
    connect_retries: int = 0  # handshakes refused for now (429, 503) and tried again
    overloaded: int = 0  # answers `overloaded`: the server shedding load, not an error
    http_switches: int = 0  # switches made through the HTTP API (PATCH), among `switches`
    http_retries: int = 0  # PATCHes answered 429 (the per-user rate) and sent again
    pushes: int = 0  # persona_changed frames received
    pushes_expected: int = 0  # other connections of a switching user, per answered switch
    errors: Counter[str] = field(default_factory=Counter)
    chat_s: array[float] = field(default_factory=lambda: array("d"))
    switch_s: array[float] = field(default_factory=lambda: array("d"))
    after_switch_s: array[float] = field(default_factory=lambda: array("d"))  # chats behind one
    http_patch_s: array[float] = field(default_factory=lambda: array("d"))  # a PATCH's 200
    http_switch_s: array[float] = field(default_factory=lambda: array("d"))  # to 200 and push
    propagation_s: array[float] = field(default_factory=lambda: array("d"))  # answer to push
    recent_s: list[float] = field(default_factory=list)
    stale_examples: list[dict[str, Any]] = field(default_factory=list)

    def opened(self) -> None:
        self.connected += 1
        self.peak_connected = max(self.peak_connected, self.connected)

    def closed(self) -> None:
        self.connected -= 1

    def error(self, kind: str) -> None:
        self.errors[kind] += 1

    def reply(self, latency_s: float, in_window: bool, after_switch: bool = False) -> None:
        self.replies += 1
        self.replies_in_window += in_window
        self.chat_s.append(latency_s)
        self.recent_s.append(latency_s)
        if after_switch:
            self.after_switch_s.append(latency_s)

    def switch_ack(self, latency_s: float) -> None:
        self.switch_acks += 1
        self.switch_s.append(latency_s)

    def propagated(self, latency_s: float) -> None:
        """A user's other connection received the push of a switch, `latency_s` after the
        switching bot had its answer (negative: before)."""
        self.propagation_s.append(latency_s)

    def stale_render(self, example: dict[str, Any]) -> None:
        self.stale += 1
        if len(self.stale_examples) < MAX_EXAMPLES:
            self.stale_examples.append(example)


def percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 when it is empty)."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize_ms(values_s: array[float] | list[float]) -> dict[str, float]:
    """count, p50, p90, p99, p99.9 and max of latencies given in seconds, in milliseconds."""
    ordered = sorted(values_s)
    summary: dict[str, float] = {"count": float(len(ordered))}
    for name, pct in PERCENTILES:
        summary[name] = round(percentile(ordered, pct) * 1000.0, 3)
    summary["max"] = round(ordered[-1] * 1000.0, 3) if ordered else 0.0
    return summary


def build_report(stats: Stats, config: dict[str, Any], chat_window_s: float) -> dict[str, Any]:
    """The final report as plain data: the same content for the terminal and for --json."""
    window = max(chat_window_s, 1e-9)
    unexpected = sum(stats.errors.values())
    return {
        "config": config,
        "ok": stats.stale == 0 and unexpected == 0,
        "totals": {
            "clients_connected": stats.peak_connected,
            "clients_ready": stats.ready,
            "chat_window_s": round(chat_window_s, 3),
            "chats_sent": stats.chats_sent,
            "replies": stats.replies,
            "chats_per_s": round(stats.replies_in_window / window, 1),
            "switches": stats.switches,
            "switch_acks": stats.switch_acks,
            "invalid_personas_sent": stats.invalid_sent,
            "invalid_personas_rejected": stats.invalid_rejected,
            "pongs": stats.pongs,
            "http_switches": stats.http_switches,
            "http_retries": stats.http_retries,
            "connect_retries": stats.connect_retries,
            "overloaded": stats.overloaded,
            "pushes": stats.pushes,
            "pushes_expected": stats.pushes_expected,
            "pushes_received": len(stats.propagation_s),
            "stale_renders": stats.stale,
            "unexpected_errors": unexpected,
        },
        "latency_ms": {
            "chat": summarize_ms(stats.chat_s),
            # the chats sent right behind a switch (before its acknowledgement), among "chat"
            "chat_after_switch": summarize_ms(stats.after_switch_s),
            "switch_ack": summarize_ms(stats.switch_s),
            "http_patch": summarize_ms(stats.http_patch_s),  # a PATCH to its 200
            # a PATCH's switch: from the request to both its 200 and the push on the bot's socket
            "http_switch": summarize_ms(stats.http_switch_s),
            # from a switch's answer to the push on each other connection of the user
            "propagation": summarize_ms(stats.propagation_s),
        },
        "errors": dict(sorted(stats.errors.items())),
        "stale_examples": list(stats.stale_examples),
    }


def write_json(report: dict[str, Any], path: str | Path) -> None:
    Path(path).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")


class LiveView:
    """Turns the running counters into a one-line-per-metric table, about once a second."""

    def __init__(self, stats: Stats, clients: int) -> None:
        self._stats = stats
        self._clients = clients
        self._last_replies = 0
        self._last_at = time.perf_counter()

    def table(self) -> Table:
        stats = self._stats
        now = time.perf_counter()
        rate = (stats.replies - self._last_replies) / max(now - self._last_at, 1e-9)
        self._last_replies, self._last_at = stats.replies, now
        recent = sorted(stats.recent_s)
        stats.recent_s.clear()
        table = Table(title="persona-chat bots", show_header=True, header_style="bold")
        for name in ("connected", "chats/s", "p50 ms", "p99 ms", "stale", "errors"):
            table.add_column(name, justify="right")
        table.add_row(
            f"{stats.connected}/{self._clients}",
            f"{rate:,.0f}",
            f"{percentile(recent, 50) * 1000:.1f}",
            f"{percentile(recent, 99) * 1000:.1f}",
            str(stats.stale),
            str(sum(stats.errors.values())),
        )
        return table


def render_report(report: dict[str, Any]) -> Group:
    """The final report as rich tables."""
    totals = Table(title="bots report", show_header=False)
    totals.add_column("what")
    totals.add_column("value", justify="right")
    for name, value in report["totals"].items():
        totals.add_row(
            name.replace("_", " "), f"{value:,}" if isinstance(value, int) else str(value)
        )
    latency = Table(title="latency (ms)")
    latency.add_column("")
    names = ["count", *(name for name, _ in PERCENTILES), "max"]
    for name in names:
        latency.add_column(name.replace("_", "."), justify="right")
    for kind, summary in report["latency_ms"].items():
        latency.add_row(kind, *(_fmt(summary[name], name) for name in names))
    errors = Table(title="errors by kind")
    errors.add_column("kind")
    errors.add_column("count", justify="right")
    for kind, count in report["errors"].items() or [("(none)", 0)]:
        errors.add_row(kind, str(count))
    verdict = "[bold green]OK[/]" if report["ok"] else "[bold red]FAILED[/]"
    return Group(totals, latency, errors, f"verdict: {verdict}")


def _fmt(value: float, name: str) -> str:
    return f"{int(value):,}" if name == "count" else f"{value:.2f}"
