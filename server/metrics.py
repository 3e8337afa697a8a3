"""Prometheus metrics of one server process, in a registry of its own."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from protocol.errors import ERROR_CODES

FRAME_TYPES = (
    "hello", "create_avatar", "get_avatar", "set_persona", "chat", "cancel", "history", "ping",
    "invalid",
)  # fmt: skip
REPLY_STATUSES = ("completed", "cancelled", "interrupted", "failed", "replayed")
CONTENT_TYPE = CONTENT_TYPE_LATEST


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
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
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

    def meter(self) -> ConversationMeter:
        """What conversations count with (protocol/conversation/core.py: `Meter`)."""
        return ConversationMeter(self)

    def render(self) -> bytes:
        if not self.multiprocess_mode:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)


class ConversationMeter:
    """The `Meter` a conversation counts with, onto this process's metrics."""

    __slots__ = ("_metrics",)

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def frame(self, kind: str) -> None:
        self._metrics.frames[kind].inc()

    def error(self, code: str) -> None:
        self._metrics.errors[code].inc()

    def reply(self, status: str, latency_s: float | None) -> None:
        self._metrics.replies[status].inc()
        if latency_s is not None:
            self._metrics.reply_latency.observe(latency_s)

    def switch(self) -> None:
        self._metrics.persona_switches.inc()
