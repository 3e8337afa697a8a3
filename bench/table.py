"""The benchmark's results: medians over repetitions, issue 18's ratios and targets, tables."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from statistics import median
from typing import Any

Row = dict[str, Any]

CPU_RATIO_TARGET = 2.0  # server CPU per chat against the echo server's per message
POSTGRES_US_TARGET = 15.0
PEER_THROUGHPUT_TARGET = 4.0
P99_RATIO_TARGET = 3.0  # at 500 connections, against the echo server's


def _med(values: Iterable[float]) -> float:
    items = list(values)
    return round(median(items), 3) if items else 0.0


def _reports(runs: Sequence[Row], server: str, clients: int) -> dict[int, Row]:
    return {
        int(r["rep"]): r["report"]
        for r in runs
        if r["server"] == server and int(r["clients"]) == clients
    }


def rows(runs: Sequence[Row]) -> list[Row]:
    """One row per (load, server): medians over repetitions; ratios are medians of the
    per-repetition ratios against the echo server's and the peer's run of the same repetition."""
    out = []
    names = list(dict.fromkeys(str(r["server"]) for r in runs))
    for clients in sorted({int(r["clients"]) for r in runs}):
        echo = _reports(runs, "echo", clients)
        peer = _reports(runs, "peer", clients)
        baseline = _reports(runs, "baseline", clients)
        for name in names:
            mine = _reports(runs, name, clients)
            if not mine:
                continue
            reps = list(mine.values())
            row: Row = {
                "clients": clients,
                "server": name,
                "repetitions": len(reps),
                "chats_per_s": _med(r["chats_per_s"] for r in reps),
                "p50_ms": _med(r["p50_ms"] for r in reps),
                "p99_ms": _med(r["p99_ms"] for r in reps),
                "server_cpu_us": _med(r["server_cpu_us"] for r in reps),
                "postgres_cpu_us": _med(r["postgres_cpu_us"] for r in reps),
                "client_busy": _med(r["client_busy"] for r in reps),
                "server_waited": _med(r.get("server_waited", 0.0) for r in reps),
                "cpu_vs_echo": _ratio(mine, echo, "server_cpu_us"),
                "throughput_vs_peer": _ratio(mine, peer, "chats_per_s"),
                "p99_vs_echo": _ratio(mine, echo, "p99_ms"),
                "cpu_vs_baseline": (
                    _ratio(mine, baseline, "server_cpu_us") if name == "server" else None
                ),
                "switches": sum(int(r["switches"]) for r in reps),
                "stale": sum(int(r["stale"]) for r in reps),
                "errors": sum(sum(r["errors"].values()) for r in reps),
            }
            out.append(row)
    return out


def _ratio(mine: dict[int, Row], other: dict[int, Row], key: str) -> float | None:
    pairs = [(mine[rep][key], other[rep][key]) for rep in mine if rep in other]
    if not pairs:
        return None
    return _med(a / max(b, 1e-9) for a, b in pairs)


def targets(table: Sequence[Row]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for every target of issue 18 this run measured."""
    found: list[tuple[str, str, bool]] = []
    for row in table:
        if row["server"] != "server":
            continue
        clients = row["clients"]
        if row["cpu_vs_echo"] is not None:
            ratio = row["cpu_vs_echo"]
            found.append(
                (f"server CPU/chat <= {CPU_RATIO_TARGET}x echo CPU/message at {clients}",
                 f"{ratio:.2f}x", ratio <= CPU_RATIO_TARGET)
            )  # fmt: skip
        pg = row["postgres_cpu_us"]
        found.append(
            (f"PostgreSQL CPU/chat <= {POSTGRES_US_TARGET:g} µs at {clients}", f"{pg:.1f} µs",
             pg <= POSTGRES_US_TARGET)
        )  # fmt: skip
        if row["throughput_vs_peer"] is not None:
            ratio = row["throughput_vs_peer"]
            found.append(
                (f"throughput >= {PEER_THROUGHPUT_TARGET:g}x the peer at {clients}",
                 f"{ratio:.2f}x", ratio >= PEER_THROUGHPUT_TARGET)
            )  # fmt: skip
        if clients == 500 and row["p99_vs_echo"] is not None:
            ratio = row["p99_vs_echo"]
            found.append(
                (f"chat p99 at 500 <= {P99_RATIO_TARGET:g}x echo p99", f"{ratio:.2f}x",
                 ratio <= P99_RATIO_TARGET)
            )  # fmt: skip
    stale = sum(row["stale"] for row in table if row["server"] != "echo")
    errors = sum(row["errors"] for row in table if row["server"] == "server")
    found.append(("0 stale renders", str(stale), stale == 0))
    found.append(("0 errors (this server)", str(errors), errors == 0))
    return found


COLUMNS = (
    ("connections", "clients"),
    ("server", "server"),
    ("chats/s", "chats_per_s"),
    ("p50 ms", "p50_ms"),
    ("p99 ms", "p99_ms"),
    ("server CPU µs/chat", "server_cpu_us"),
    ("PostgreSQL CPU µs/chat", "postgres_cpu_us"),
    ("CPU / echo's", "cpu_vs_echo"),
    ("chats/s / peer's", "throughput_vs_peer"),
    ("p99 / echo's", "p99_vs_echo"),
    ("CPU / baseline's", "cpu_vs_baseline"),
    ("load client busy", "client_busy"),
    ("server waited for its core", "server_waited"),
    ("switches", "switches"),
    ("stale", "stale"),
    ("errors", "errors"),
)
RATIOS = ("cpu_vs_echo", "throughput_vs_peer", "p99_vs_echo", "cpu_vs_baseline")


def cells(row: Row, columns: Sequence[tuple[str, str]] = COLUMNS) -> list[str]:
    out = []
    for _, key in columns:
        value = row.get(key)
        if value is None:
            out.append("-")
        elif key in RATIOS:
            out.append(f"{value:.2f}x")
        elif key in ("client_busy", "server_waited"):
            out.append(f"{100 * value:.0f}%")
        elif isinstance(value, float):
            out.append(f"{value:,.1f}")
        elif isinstance(value, int):
            out.append(f"{value:,}")
        else:
            out.append(str(value))
    return out


def markdown(table: Sequence[Row], columns: Sequence[tuple[str, str]] = COLUMNS) -> str:
    head = "| " + " | ".join(name for name, _ in columns) + " |"
    rule = "|" + "|".join("---:" if key != "server" else "---" for _, key in columns) + "|"
    body = ["| " + " | ".join(cells(row, columns)) + " |" for row in table]
    return "\n".join([head, rule, *body])


def markdown_targets(found: Sequence[tuple[str, str, bool]]) -> str:
    lines = ["| target | measured | met |", "|---|---:|:---:|"]
    lines += [f"| {name} | {value} | {'yes' if ok else 'NO'} |" for name, value, ok in found]
    return "\n".join(lines)
