"""The benchmark's results: medians over repetitions, ratios to the echo server, targets, tables."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from statistics import median
from typing import Any

Row = dict[str, Any]

THROUGHPUT_TARGETS = {50: 0.5, 500: 0.4}
P99_RATIO_TARGET = 2.0
IDLE_KIB_TARGET = 24.0
HELD_TARGET = 5000


def _med(values: Iterable[float]) -> float:
    items = list(values)
    return round(median(items), 3) if items else 0.0


def _runs(runs: Sequence[Row], server: str, clients: int) -> list[Row]:
    ordered = sorted(
        (r for r in runs if r["server"] == server and r["clients"] == clients),
        key=lambda r: int(r["rep"]),
    )
    return [r["report"] for r in ordered]


def throughput_rows(runs: Sequence[Row]) -> list[Row]:
    """One row per load: medians over repetitions, and medians of the per-repetition ratios."""
    rows = []
    for clients in sorted({int(r["clients"]) for r in runs}):
        echo, chat = _runs(runs, "echo", clients), _runs(runs, "server", clients)
        pairs = list(zip(echo, chat, strict=False))
        rows.append(
            {
                "clients": clients,
                "repetitions": len(pairs),
                "echo_chats_per_s": _med(e["totals"]["chats_per_s"] for e in echo),
                "server_chats_per_s": _med(c["totals"]["chats_per_s"] for c in chat),
                "throughput_ratio": _med(_ratio(c, e, "chats_per_s") for e, c in pairs),
                "echo_p50_ms": _med(e["latency_ms"]["chat"]["p50"] for e in echo),
                "server_p50_ms": _med(c["latency_ms"]["chat"]["p50"] for c in chat),
                "echo_p99_ms": _med(e["latency_ms"]["chat"]["p99"] for e in echo),
                "server_p99_ms": _med(c["latency_ms"]["chat"]["p99"] for c in chat),
                "p99_ratio": _med(_p99_ratio(c, e) for e, c in pairs),
                "switch_ack_p99_ms": _med(c["latency_ms"]["switch_ack"]["p99"] for c in chat),
                "switches": sum(c["totals"]["switch_acks"] for c in chat),
                "echo_cpu_us": _med(e["cpu_us_per_reply"]["server"] for e in echo),
                "server_cpu_us": _med(c["cpu_us_per_reply"]["server"] for c in chat),
                "postgres_cpu_us": _med(c["cpu_us_per_reply"]["postgres"] for c in chat),
                "echo_client_cpu_us": _med(_client_cpu(e) for e in echo),
                "server_client_cpu_us": _med(_client_cpu(c) for c in chat),
                **_baseline(runs, clients, chat),
                "stale_renders": sum(c["totals"]["stale_renders"] for c in chat),
                "errors": sum(r["totals"]["unexpected_errors"] for r in (*echo, *chat)),
            }
        )
    return rows


def _baseline(runs: Sequence[Row], clients: int, chat: Sequence[Row]) -> Row:
    """The baseline commit's server at this load, when the run had one (`--baseline`)."""
    old = _runs(runs, "baseline", clients)
    if not old:
        return {}
    pairs = list(zip(old, chat, strict=False))
    return {
        "baseline_chats_per_s": _med(o["totals"]["chats_per_s"] for o in old),
        "baseline_cpu_us": _med(o["cpu_us_per_reply"]["server"] for o in old),
        "baseline_postgres_cpu_us": _med(o["cpu_us_per_reply"]["postgres"] for o in old),
        "cpu_vs_baseline": _med(
            c["cpu_us_per_reply"]["server"] / max(o["cpu_us_per_reply"]["server"], 1e-9)
            for o, c in pairs
        ),
        "baseline_stale": sum(o["totals"]["stale_renders"] for o in old),
    }


BASELINE_COLUMNS = (
    ("clients", "clients"),
    ("baseline chats/s", "baseline_chats_per_s"),
    ("server chats/s", "server_chats_per_s"),
    ("baseline CPU µs/chat", "baseline_cpu_us"),
    ("server CPU µs/chat", "server_cpu_us"),
    ("server / baseline CPU", "cpu_vs_baseline"),
    ("baseline PostgreSQL µs/chat", "baseline_postgres_cpu_us"),
    ("server PostgreSQL µs/chat", "postgres_cpu_us"),
    ("baseline stale", "baseline_stale"),
    ("stale", "stale_renders"),
)


def _client_cpu(report: Row) -> float:
    return float(report["cpu_us_per_reply"].get("client", 0.0))


def _ratio(chat: Row, echo: Row, key: str) -> float:
    return float(chat["totals"][key]) / max(float(echo["totals"][key]), 1e-9)


def _p99_ratio(chat: Row, echo: Row) -> float:
    return float(chat["latency_ms"]["chat"]["p99"]) / max(
        float(echo["latency_ms"]["chat"]["p99"]), 1e-9
    )


def targets(
    rows: Sequence[Row], idle: Sequence[Row], facts: Row, runs: Sequence[Row]
) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for every target of issue 3 that this run measured."""
    found: list[tuple[str, str, bool]] = []
    if facts:
        found.append(_durable(facts, runs))
    by_load = {row["clients"]: row for row in rows}
    for clients, wanted in THROUGHPUT_TARGETS.items():
        if clients in by_load:
            ratio = by_load[clients]["throughput_ratio"]
            found.append(
                (f"throughput >= {wanted}x echo at {clients}", f"{ratio:.2f}x", ratio >= wanted)
            )
    if 500 in by_load:
        ratio = by_load[500]["p99_ratio"]
        found.append(("chat p99 at 500 <= 2x echo p99", f"{ratio:.2f}x", ratio <= P99_RATIO_TARGET))
    for row in rows:
        switch, chat = row["switch_ack_p99_ms"], row["server_p99_ms"]
        measured = f"{switch:.1f} vs {chat:.1f} ms" if row["switches"] else "no switch acked"
        name = f"switch-ack p99 <= chat p99 at {row['clients']}"
        found.append((name, measured, bool(row["switches"]) and switch <= chat))
    for item in idle:
        if item["server"] == "server":
            kib = item["kib_per_connection"]
            found.append(
                (f"<= 24 KiB per idle session ({item['connections']})", f"{kib:.1f} KiB",
                 kib <= IDLE_KIB_TARGET)
            )  # fmt: skip
    for item in idle:
        if item["server"] == "server" and item["connections"] >= HELD_TARGET:
            held = item["ready"] == item["pongs"] == item["connections"] and not item["errors"]
            found.append((f"{item['connections']} sessions held, 0 errors", _held(item), held))
    stale = sum(row["stale_renders"] for row in rows)
    found.append(("0 stale renders in every run", str(stale), stale == 0))
    return found


def _durable(facts: Row, runs: Sequence[Row]) -> tuple[str, str, bool]:
    """Every completed reply the bots received is in the database, with fsync on."""
    received = sum(int(r["report"]["totals"]["replies"]) for r in runs if r["server"] == "server")
    stored = facts.get("stored_completed_replies")
    synced = facts.get("fsync") == "on" and facts.get("synchronous_commit") == "on"
    met = synced and isinstance(stored, int) and stored >= received
    measured = f"{stored} stored >= {received} received, fsync {facts.get('fsync')}"
    return ("every reply durably committed", measured, met)


def _held(item: Row) -> str:
    errors = sum(item["errors"].values())
    return f"{item['pongs']}/{item['connections']} answered, {errors} errors"


THROUGHPUT_COLUMNS = (
    ("clients", "clients"),
    ("echo chats/s", "echo_chats_per_s"),
    ("server chats/s", "server_chats_per_s"),
    ("ratio", "throughput_ratio"),
    ("echo p50 ms", "echo_p50_ms"),
    ("server p50 ms", "server_p50_ms"),
    ("echo p99 ms", "echo_p99_ms"),
    ("server p99 ms", "server_p99_ms"),
    ("p99 ratio", "p99_ratio"),
    ("switch-ack p99 ms", "switch_ack_p99_ms"),
    ("echo CPU µs/chat", "echo_cpu_us"),
    ("server CPU µs/chat", "server_cpu_us"),
    ("PostgreSQL CPU µs/chat", "postgres_cpu_us"),
    ("load client CPU µs/chat (echo)", "echo_client_cpu_us"),
    ("load client CPU µs/chat (server)", "server_client_cpu_us"),
    ("stale", "stale_renders"),
    ("errors", "errors"),
)
IDLE_COLUMNS = (
    ("server", "server"),
    ("connections", "connections"),
    ("ready", "ready"),
    ("RSS before KiB", "rss_before_kib"),
    ("RSS after KiB", "rss_after_kib"),
    ("KiB per connection", "kib_per_connection"),
    ("pongs", "pongs"),
)


def cells(row: Row, columns: Sequence[tuple[str, str]]) -> list[str]:
    out = []
    for _, key in columns:
        value = row[key]
        if key in ("throughput_ratio", "p99_ratio", "cpu_vs_baseline"):
            out.append(f"{value:.2f}x")
        elif isinstance(value, float):
            out.append(f"{value:,.1f}")
        elif isinstance(value, int):
            out.append(f"{value:,}")
        else:
            out.append(str(value))
    return out


def markdown(rows: Sequence[Row], columns: Sequence[tuple[str, str]]) -> str:
    head = "| " + " | ".join(name for name, _ in columns) + " |"
    rule = "|" + "|".join("---:" for _ in columns) + "|"
    body = ["| " + " | ".join(cells(row, columns)) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def markdown_targets(found: Sequence[tuple[str, str, bool]]) -> str:
    lines = ["| target | measured | met |", "|---|---:|:---:|"]
    lines += [f"| {name} | {value} | {'yes' if ok else 'NO'} |" for name, value, ok in found]
    return "\n".join(lines)
