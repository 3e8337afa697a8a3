"""Smoke tests of issue 18's benchmark commands, with tiny loads: each must run to its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from tests.processes import ROOT, clean_env

TIMEOUT_S = 60


def run(*argv: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_bench_runs_echo_peer_and_server_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run("bench", "--clients", "4", "--repeats", "1", "--duration", "0.5", "--json", str(out))
    summary = orjson.loads(out.read_bytes())
    servers = {row["server"]: row for row in summary["table"]}
    assert set(servers) == {"echo", "peer", "server"}
    for name, row in servers.items():
        assert row["chats_per_s"] > 0, name
        assert row["stale"] == 0, name
    assert servers["server"]["switches"] > 0
    assert servers["peer"]["postgres_cpu_us"] > 0


def test_idle_holds_sessions_and_reports_rss_per_session() -> None:
    stdout = run("bench.idle", "--sessions", "60", "--steps", "20", "--workers", "2",
                 "--hold", "0", "--settle", "0.3")  # fmt: skip
    assert "| server | 60 | 60 |" in stdout
    assert "| echo | 60 | 60 |" in stdout


def test_streaming_measures_the_delay_and_cpu_per_delta(tmp_path: Path) -> None:
    out = tmp_path / "streaming.json"
    run("bench.streaming", "--streams", "4", "--warmup", "1", "--duration", "1.5",
        "--echo-duration", "0.5", "--json", str(out))  # fmt: skip
    report = orjson.loads(out.read_bytes())
    (first,) = report["runs"]
    assert first["deltas"] > 0
    assert 25 <= first["deltas_per_s_per_stream"] <= 35
    assert first["errors"] == {}


def test_pg_rows_prints_each_design_per_turn() -> None:
    out = run("bench.pg_rows", "--turns", "200", "--batch", "20", "--repeats", "1")
    for design in ("two rows (today)", "two rows by COPY", "one row"):
        assert f"  {design}" in out, out
    assert "a commit costs about" in out
