"""run.py as a user runs it: serve on the embedded database, token, schema, migrate, restarts."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from tests.client import Client
from tests.processes import Served, run_py, serve


async def _serve(data_dir: Path) -> Served:
    return await serve("--data-dir", str(data_dir), log_path=data_dir.parent / "serve.log")


@pytest.fixture
async def data_dir(tmp_path: Path) -> AsyncIterator[Path]:
    path = tmp_path / "data"
    yield path
    # a failed test must not leave a PostgreSQL behind
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "postgres" and str(path) in " ".join(proc.info["cmdline"] or []):
            proc.terminate()


async def _chat_once(url: str, token: str) -> dict[str, object]:
    async with Client(url) as client:
        welcome = await client.hello(token)
        assert welcome["type"] == "welcome", welcome
        if welcome["avatar"] is None:
            await client.request({"type": "create_avatar", "name": "Cli", "personality": "witty"})
        return await client.request({"type": "chat", "text": "are you there?"})


def _postgres_running(data_dir: Path) -> bool:
    pid_file = data_dir / "pgdata" / "postmaster.pid"
    if not pid_file.exists():
        return False
    return bool(psutil.pid_exists(int(pid_file.read_text().split()[0])))


async def test_serve_prints_url_token_hint_and_data_dir(data_dir: Path) -> None:
    served = await _serve(data_dir)
    try:
        assert "python run.py token alice" in served.banner
        assert str(data_dir.resolve()) in served.banner
        assert (data_dir / "jwt_secret").stat().st_mode & 0o777 == 0o600
        code, token, _ = await run_py("token", "alice", "--data-dir", str(data_dir))
        assert code == 0
        reply = await _chat_once(served.url, token.strip())
        assert (reply["type"], reply["persona"]) == ("reply", "witty")
    finally:
        assert await served.stop() == 0
    assert not _postgres_running(data_dir)


async def test_secret_is_reused_across_starts(data_dir: Path) -> None:
    _, first, _ = await run_py("token", "bob", "--data-dir", str(data_dir))
    secret = (data_dir / "jwt_secret").read_text()
    _, second, _ = await run_py("token", "bob", "--data-dir", str(data_dir))
    assert (data_dir / "jwt_secret").read_text() == secret
    assert first.split(".")[0] == second.split(".")[0]


async def test_start_after_kill_9_reuses_data_and_works(data_dir: Path) -> None:
    served = await _serve(data_dir)
    _, token, _ = await run_py("token", "carol", "--data-dir", str(data_dir))
    first = await _chat_once(served.url, token.strip())
    await served.stop(signal.SIGKILL)
    assert _postgres_running(data_dir)  # the embedded server was left behind
    again = await _serve(data_dir)
    try:
        second = await _chat_once(again.url, token.strip())
        assert isinstance(first["reply_id"], int) and isinstance(second["message_id"], int)
        assert second["message_id"] > first["reply_id"]
    finally:
        assert await again.stop() == 0
    assert not _postgres_running(data_dir)


async def test_start_after_postgres_was_killed_too(data_dir: Path) -> None:
    served = await _serve(data_dir)
    pid = int((data_dir / "pgdata" / "postmaster.pid").read_text().split()[0])
    await served.stop(signal.SIGKILL)
    psutil.Process(pid).kill()
    await asyncio.sleep(0.5)
    assert (data_dir / "pgdata" / "postmaster.pid").exists()  # stale
    again = await _serve(data_dir)
    try:
        _, token, _ = await run_py("token", "dave", "--data-dir", str(data_dir))
        assert (await _chat_once(again.url, token.strip()))["type"] == "reply"
    finally:
        assert await again.stop() == 0


async def test_schema_command_prints_both_directions() -> None:
    code, out, _ = await run_py("schema")
    schema = json.loads(out)
    assert code == 0
    assert {"client_to_server", "server_to_client"} <= schema.keys()


async def test_migrate_command_applies_then_reports_up_to_date(data_dir: Path) -> None:
    code, out, _ = await run_py("migrate", "--data-dir", str(data_dir))
    assert (code, out.strip()) == (0, "applied: initial, messages_user_fk")
    code, out, _ = await run_py("migrate", "--data-dir", str(data_dir))
    assert (code, out.strip()) == (0, "the schema is up to date")
    assert not _postgres_running(data_dir)
