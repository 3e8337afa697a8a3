"""The chaos run, shortened: two instances on one embedded PostgreSQL under bots, and one
SIGKILL of each kind (the postmaster, a worker, a whole instance, the fake LLM endpoint)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import orjson

from tests.processes import ROOT, clean_env


async def test_a_short_chaos_run_loses_nothing_and_recovers_from_each_kill(
    tmp_path: Path,
) -> None:
    report_path = tmp_path / "chaos.json"
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.chaos", "--duration", "28", "--kills", "1",
        "--clients", "20", "--generator", "openai",
        "--workdir", str(tmp_path / "chaos"), "--json", str(report_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env=clean_env(), cwd=ROOT,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(process.communicate(), 85)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    said = out.decode(errors="replace")
    print(f"\nchaos run in {time.monotonic() - started:.1f} s:\n{said[-2500:]}")
    assert process.returncode == 0, said[-5000:]
    report = orjson.loads(report_path.read_bytes())
    assert [f["kind"] for f in report["faults"]] == ["postgres", "worker", "instance", "llm"]
    assert all(r["bots_replied"] > 0 for r in report["recovery"]), report["recovery"]
    assert report["totals"]["stale_renders"] == 0
    ledger = report["ledger"]
    assert ledger["lost_replies"] == 0 and ledger["lost_switches"] == 0, ledger
    assert ledger["replies_checked"] > 200 and ledger["switches_acked"] > 50, ledger
    assert report["errors_unexplained"] == [] and report["logs"]["tracebacks"] == {}
    assert "unavailable" in report["errors"]  # the database's outage was answered, not hidden
    # the log says what happened: the keeper restarted the killed postmaster
    assert any("starting it again" in line for line in report["logs"]["error_lines"])
