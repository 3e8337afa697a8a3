"""Prometheus metrics of one server process, in a registry of its own.

What conversations count on the hot path (frames, errors, replies and their latency, switches)
is counted into plain ints, without prometheus-client's per-value lock, and folded into the
prometheus metrics when /metrics is scraped and by the process's ticker each second (in
`serve --workers N`, each worker's mmap files are written only by that fold, so a scrape may
miss up to a second of another worker's counts).
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from protocol.conversation.load import Load
from protocol.errors import ERROR_CODES

FRAME_TYPES = (
    "hello", "create_avatar", "get_avatar", "set_persona", "chat", "cancel", "history", "ping",
    "invalid",
)  # fmt: skip
REPLY_STATUSES = ("completed", "cancelled", "interrupted", "failed", "replayed")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Tally:
    """What the conversations of a process counted since the last fold: plain ints, and the
    reply latencies as counts per bucket (the last one past the largest bound) and a sum."""

    __slots__ = ("errors", "frames", "latency_buckets", "latency_sum", "replies", "switches")

    def __init__(self) -> None:
        self.frames = dict.fromkeys(FRAME_TYPES, 0)
        self.errors = dict.fromkeys(ERROR_CODES, 0)
        self.replies = dict.fromkeys(REPLY_STATUSES, 0)
        self.switches = 0
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0


class Metrics:
    """Counters and gauges the session and app update; rendered at GET /metrics."""

    def __init__(self, multiprocess_mode: bool = False) -> None:
        """With `multiprocess_mode`, /metrics sums the workers of `serve --workers N`
        (prometheus-client's multiprocess mode, PROMETHEUS_MULTIPROC_DIR)."""
        self.multiprocess_mode = multiprocess_mode
        self.registry = CollectorRegistry(auto_describe=True)
        self.connections = Gauge(
            "chat_connections_open",
            "Open WebSocket connections",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.sessions = Gauge(
            "chat_sessions_authenticated",
            "Authenticated sessions",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        frames = Counter(
            "chat_frames_received", "Frames received, by type", ["type"], registry=self.registry
        )
        self.frames = {name: frames.labels(name) for name in FRAME_TYPES}
        errors = Counter(
            "chat_errors", "Error frames sent, by code", ["code"], registry=self.registry
        )
        self.errors = {code: errors.labels(code) for code in ERROR_CODES}
        self.closes = Counter(
            "chat_closes", "Connections closed by the server, by close code", ["code"],
            registry=self.registry,
        )  # fmt: skip
        self.notifications = Counter(
            "chat_persona_notifications",
            "Persona changes received from other processes",
            registry=self.registry,
        )
        self.listener_up = Gauge(
            "chat_persona_listener_up",
            "Processes whose LISTEN connection for persona changes is up",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.persona_switches = Counter(
            "chat_persona_switches", "Committed persona switches", registry=self.registry
        )
        replies = Counter(
            "chat_replies", "Replies sent, by status", ["status"], registry=self.registry
        )
        self.replies = {status: replies.labels(status) for status in REPLY_STATUSES}
        self.reply_latency = Histogram(
            "chat_reply_latency_seconds",
            "From a chat's arrival to its committed reply",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # observe() fills one of these per observation (non-cumulative, the last for +Inf)
        self._latency_buckets = self.reply_latency._buckets
        self._latency_sum = self.reply_latency._sum
        assert len(self._latency_buckets) == len(LATENCY_BUCKETS) + 1
        self.commit_batch = Histogram(
            "chat_commit_batch_size",
            "Turns written per group commit",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=self.registry,
        )
        self.pool_in_use = Gauge(
            "chat_db_pool_in_use",
            "Database connections checked out",
            registry=self.registry,
            multiprocess_mode="livesum",
        )

        self.loop_lag = Gauge(
            "chat_event_loop_lag_seconds",
            "How late the event loop ran its load monitor's timer, last sample (workers: the most)",
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.shedding = Gauge(
            "chat_overload_shedding",
            "1 while the process refuses new chats as overloaded",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.shed = Counter(
            "chat_overload_refused",
            "Chats refused as overloaded before anything of them was written",
            registry=self.registry,
        )
        self._tally = Tally()
        self._load: Load | None = None
        self._refused = 0  # the load's refusals already folded in

    def meter(self) -> ConversationMeter:
        """What conversations count with (protocol/conversation/core.py: `Meter`)."""
        return ConversationMeter(self._tally)

    def watch(self, load: Load) -> None:
        """Show `load` (the process's) in the metrics, from the next fold on."""
        self._load = load

    def fold(self) -> None:
        """Add what was counted since the last fold to the prometheus metrics, and empty the
        tally (in place: every meter holds it)."""
        tally = self._tally
        _fold_counts(tally.frames, self.frames)
        _fold_counts(tally.errors, self.errors)
        _fold_counts(tally.replies, self.replies)
        if tally.switches:
            self.persona_switches.inc(tally.switches)
            tally.switches = 0
        buckets = tally.latency_buckets
        if any(buckets):
            for index, count in enumerate(buckets):
                if count:
                    self._latency_buckets[index].inc(count)
                    buckets[index] = 0
            self._latency_sum.inc(tally.latency_sum)
            tally.latency_sum = 0.0
        load = self._load
        if load is not None:
            self.loop_lag.set(load.last_lag_s)
            self.shedding.set(1 if load.shedding else 0)
            if load.refused > self._refused:
                self.shed.inc(load.refused - self._refused)
                self._refused = load.refused

    def render(self) -> bytes:
        self.fold()
        if not self.multiprocess_mode:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)


def _fold_counts(counts: dict[str, int], into: dict[str, Counter]) -> None:
    for key, count in counts.items():
        if count:
            into[key].inc(count)
            counts[key] = 0


class ConversationMeter:
    """The `Meter` a conversation counts with: into the process's current tally, without a
    lock (every conversation runs on the one event loop)."""

    __slots__ = ("_tally",)

    def __init__(self, tally: Tally) -> None:
        self._tally = tally

    def frame(self, kind: str) -> None:
        self._tally.frames[kind] += 1

    def error(self, code: str) -> None:
        self._tally.errors[code] += 1

    def reply(self, status: str, latency_s: float | None) -> None:
        tally = self._tally
        tally.replies[status] += 1
        if latency_s is not None:
            tally.latency_buckets[bisect_left(LATENCY_BUCKETS, latency_s)] += 1
            tally.latency_sum += latency_s

    def switch(self) -> None:
        self._tally.switches += 1
