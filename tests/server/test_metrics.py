"""The metrics' hot-path counting: plain ints folded into prometheus-client's metrics, which
then read as if every count had gone to them directly. No socket."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from protocol.conversation.load import Load
from server.metrics import LATENCY_BUCKETS, Metrics

LATENCIES = (0.0005, 0.001, 0.0011, 0.004, 0.05, 0.7, 12.0, 31.0, 90.0)


def _lines(text: bytes, prefix: str) -> list[str]:
    return [
        line
        for line in text.decode().splitlines()
        if line.startswith(prefix) and not line.startswith(prefix + "_created")
    ]


def test_counts_read_as_if_they_had_been_counted_directly() -> None:
    metrics = Metrics()
    meter, other = metrics.meter(), metrics.meter()
    meter.frame("chat")
    other.frame("chat")
    meter.frame("ping")
    meter.error("busy")
    other.error("overloaded")
    meter.switch()
    meter.reply("replayed", None)
    lines = set(metrics.render().decode().splitlines())
    for expected in (
        'chat_frames_received_total{type="chat"} 2.0',
        'chat_frames_received_total{type="ping"} 1.0',
        'chat_frames_received_total{type="hello"} 0.0',
        'chat_errors_total{code="busy"} 1.0',
        'chat_errors_total{code="overloaded"} 1.0',
        "chat_persona_switches_total 1.0",
        'chat_replies_total{status="replayed"} 1.0',
        "chat_reply_latency_seconds_count 0.0",
    ):
        assert expected in lines, expected
    meter.frame("chat")  # after a fold, counting goes on from where it was
    assert 'chat_frames_received_total{type="chat"} 3.0' in metrics.render().decode()


def test_reply_latencies_fall_in_the_buckets_observe_would_put_them_in() -> None:
    metrics = Metrics()
    meter = metrics.meter()
    reference = Histogram(
        "chat_reply_latency_seconds",
        "From a chat's arrival to its committed reply",
        buckets=LATENCY_BUCKETS,
        registry=(registry := CollectorRegistry()),
    )
    for index, latency in enumerate(LATENCIES):
        meter.reply("completed", latency)
        reference.observe(latency)
        if index == 3:  # two folds: the second adds to the first
            metrics.fold()
    ours = _lines(metrics.render(), "chat_reply_latency_seconds")
    assert ours == _lines(generate_latest(registry), "chat_reply_latency_seconds")
    assert 'chat_reply_latency_seconds_bucket{le="+Inf"} 9.0' in ours
    assert 'chat_replies_total{status="completed"} 9.0' in metrics.render().decode()


def test_the_load_shows_its_lag_whether_it_sheds_and_the_chats_it_refused() -> None:
    metrics = Metrics()
    load = Load(0.2, 1.0)
    metrics.watch(load)
    load.sample(0.3, 1.0, 1.1)
    load.sample(0.25, 1.35, 1.45)
    load.refuse()
    load.refuse()
    lines = set(metrics.render().decode().splitlines())
    assert {
        "chat_overload_shedding 1.0",
        "chat_event_loop_lag_seconds 0.25",
        "chat_overload_refused_total 2.0",
    } <= lines
    load.refuse()
    assert "chat_overload_refused_total 3.0" in metrics.render().decode().splitlines()
