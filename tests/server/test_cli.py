"""run.py as a user runs it: serve on the embedded database, token, schema, migrate, restarts."""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import httpx
import jwt
import psutil
import pytest

from run import build_parser
from server.auth import mint_token
from server.startup import listen_error
from tests.client import Client
from tests.conftest import SECRET
from tests.processes import BANNER, ROOT, Served, clean_env, run_py, serve


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


async def test_serve_prints_url_page_token_hint_and_data_dir(data_dir: Path) -> None:
    served = await _serve(data_dir)
    try:
        assert "python run.py token alice" in served.banner
        page = f"http://127.0.0.1:{served.port}/"
        assert f"\n  web page:     {page}\n" in served.banner
        async with httpx.AsyncClient() as http:
            answer = await http.get(page)
        assert answer.status_code == 200 and "<html" in answer.text.lower()
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
    assert (code, out.strip()) == (0, "applied: initial, messages_user_fk, reply_status, personas")
    code, out, _ = await run_py("migrate", "--data-dir", str(data_dir))
    assert (code, out.strip()) == (0, "the schema is up to date")
    assert not _postgres_running(data_dir)


# ---------------------------------------------------------------------------- the first hour


def one_line(stderr: str) -> str:
    """The single line a configuration mistake is said in (no traceback, no log line)."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


PORT_ABC = "error: CHAT_PORT=abc is not a valid port: set CHAT_PORT to a number from 0 to 65535"


@pytest.mark.parametrize(
    "command",
    [
        ["serve"],
        ["serve", "--workers", "2"],
        ["token", "alice"],
        ["migrate"],
        ["chat", "--user", "alice"],
        ["bots"],
    ],
)
async def test_invalid_port_variable_is_one_line_and_exit_2_in_every_command(
    command: list[str], tmp_path: Path
) -> None:
    code, out, err = await run_py(
        *command, "--data-dir", str(tmp_path / "data"), env=clean_env(CHAT_PORT="abc")
    )
    assert (code, out, one_line(err)) == (2, "", PORT_ABC)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("env", "flags", "line"),
    [
        (
            {"CHAT_GENERATOR": "gpt"},
            [],
            "error: CHAT_GENERATOR=gpt is not a valid generator: set CHAT_GENERATOR to one of"
            " template, openai",
        ),
        (
            {},
            ["--port", "70000"],
            "error: --port 70000 is not a valid port: set --port to a number from 0 to 65535",
        ),
        (
            {"CHAT_DB_POOL_MAX": "2"},
            [],
            "error: CHAT_DB_POOL_MAX=2 is not valid: set CHAT_DB_POOL_MAX to a whole number of"
            " at least 4",
        ),
        (
            {"CHAT_DB_WAIT_S": "-1"},
            [],
            "error: CHAT_DB_WAIT_S=-1 is not valid: set CHAT_DB_WAIT_S to a number of at least 0",
        ),
        (
            {"CHAT_TRUSTED_PROXIES": "10.0.0.0/8"},
            [],
            "error: CHAT_TRUSTED_PROXIES is not valid: set CHAT_TRUSTED_PROXIES to a JSON list of"
            ' addresses or networks, e.g. ["10.0.0.0/8"]',
        ),
        (
            {},
            ["--log-level", "loud"],
            "error: --log-level LOUD is not a valid log level: set --log-level to one of DEBUG,"
            " INFO, WARNING, ERROR",
        ),
        ({}, ["--workers", "0"], "error: --workers 0 is not valid: set --workers to 1 or more"),
        (
            {},
            ["--workers", "x"],
            "error: argument --workers: invalid int value: 'x': see run.py serve --help",
        ),
    ],
)
async def test_invalid_setting_names_it_and_the_fix_in_one_line(
    env: dict[str, str], flags: list[str], line: str, tmp_path: Path
) -> None:
    code, out, err = await run_py(
        "serve", *flags, "--data-dir", str(tmp_path), env=clean_env(**env)
    )
    assert (code, out, one_line(err)) == (2, "", line)


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_port_in_use_is_one_line_and_exit_2(workers: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = await run_py(
            "serve", "--port", str(port), "--workers", workers, "--data-dir", str(tmp_path)
        )
    assert (code, out) == (2, "")
    assert one_line(err) == (
        f"error: port {port} on 127.0.0.1 is in use (another server?): stop it, or choose"
        " another port with --port or CHAT_PORT (0 picks a free one)"
    )


@pytest.mark.parametrize(
    "command", [["serve"], ["serve", "--workers", "2"], ["token", "alice"], ["migrate"]]
)
async def test_data_dir_that_is_a_file_is_one_line_and_exit_2(
    command: list[str], tmp_path: Path
) -> None:
    path = tmp_path / "a-file"
    path.write_text("not a directory")
    code, out, err = await run_py(*command, "--data-dir", str(path))
    assert (code, out) == (2, "")
    assert one_line(err) == (
        f"error: the data directory {path} is not a directory: choose another with --data-dir"
        " or CHAT_DATA_DIR"
    )


def read_only_dir(tmp_path: Path) -> Path:
    """A directory this process cannot create files in (root writes anywhere but on a
    read-only file system)."""
    if os.geteuid() == 0:
        return Path("/sys")
    path = tmp_path / "read-only"
    path.mkdir(mode=0o500)
    return path


async def test_data_dir_not_writable_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = read_only_dir(tmp_path)
    code, out, err = await run_py("serve", "--data-dir", str(path))
    assert (code, out) == (2, "")
    assert one_line(err) == (
        f"error: the data directory {path} is not writable (permission denied): make it"
        " writable for this user, or choose another with --data-dir or CHAT_DATA_DIR"
    )


@pytest.mark.parametrize(
    ("url", "line"),
    [
        (
            "mysql://u:hunter2@db/chat",
            "error: DATABASE_URL is not a PostgreSQL URL (it has mysql://): write it as"
            " postgresql://USER:PASSWORD@HOST:5432/DATABASE",
        ),
        (
            "postgresql://u:hunter2@db:port/chat",
            "error: DATABASE_URL is malformed: write it as"
            " postgresql://USER:PASSWORD@HOST:5432/DATABASE",
        ),
    ],
)
async def test_malformed_database_url_is_one_line_without_the_password(
    url: str, line: str, tmp_path: Path
) -> None:
    for command in (["serve"], ["migrate"]):
        code, out, err = await run_py(
            *command, "--data-dir", str(tmp_path), env=clean_env(DATABASE_URL=url)
        )
        assert (code, out, one_line(err)) == (2, "", line)


async def test_refused_database_without_waiting_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = clean_env(
        DATABASE_URL=f"postgresql://u:hunter2@127.0.0.1:{port}/chat",
        CHAT_DB_WAIT_S="0",
        CHAT_JWT_SECRET=SECRET,
    )
    for command in (["serve"], ["serve", "--workers", "2"], ["migrate"]):
        code, out, err = await run_py(*command, "--data-dir", str(tmp_path), env=env)
        assert (code, out) == (2, "")
        assert one_line(err) == (
            f"error: cannot reach PostgreSQL at 127.0.0.1:{port}/chat: connection refused: check"
            " that it runs and that DATABASE_URL names it, or set CHAT_DB_WAIT_S to wait longer"
        )


async def test_unknown_database_host_is_waited_for_then_one_line(tmp_path: Path) -> None:
    env = clean_env(
        DATABASE_URL="postgresql://nohost.invalid/x", CHAT_DB_WAIT_S="1", CHAT_JWT_SECRET=SECRET
    )
    code, out, err = await run_py("serve", "--data-dir", str(tmp_path), env=env)
    assert (code, out) == (2, "")
    *tries, last = err.splitlines()
    assert last.startswith(
        "error: cannot reach PostgreSQL at nohost.invalid:5432/x: unknown host nohost.invalid"
        " (waited 1 s, "
    )
    assert last.endswith(
        ": check that it runs and that DATABASE_URL names it, or set CHAT_DB_WAIT_S to wait longer"
    )
    assert len(tries) >= 2  # at 0 and 0.5 s, then 1 s
    for number, line in enumerate(tries, 1):
        assert (
            "WARNING server.startup: waiting for PostgreSQL at nohost.invalid:5432/x: unknown"
            f" host nohost.invalid; try {number}, the next in "
        ) in line


async def proxy(listen_port: int, target: str) -> asyncio.Server:
    """A TCP port in front of the database `target` names (Unix socket or TCP): the database
    appearing at a new address, as a container's PostgreSQL does when it comes up."""
    parts = urlsplit(target)
    socket_dir = parse_qs(parts.query).get("host", [""])[0]

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if parts.hostname:
            far = await asyncio.open_connection(parts.hostname, parts.port or 5432)
        else:
            far = await asyncio.open_unix_connection(f"{socket_dir}/.s.PGSQL.{parts.port or 5432}")
        await asyncio.gather(pipe(reader, far[1]), pipe(far[0], writer), return_exceptions=True)

    return await asyncio.start_server(handle, "127.0.0.1", listen_port)


async def test_server_started_before_its_database_waits_and_then_works(
    database_url: str, tmp_path: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    parts = urlsplit(database_url)
    userinfo = parts.netloc.rpartition("@")[0]
    query = "&".join(q for q in parts.query.split("&") if q and not q.startswith("host="))
    url = urlunsplit(("postgresql", f"{userinfo}@127.0.0.1:{port}", parts.path, query, ""))
    env = clean_env(DATABASE_URL=url, CHAT_DB_WAIT_S="30", CHAT_JWT_SECRET=SECRET)
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "run.py"), "serve", "--port", "0", "--data-dir", str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    server: asyncio.Server | None = None
    try:
        async with asyncio.timeout(30):
            line = (await process.stderr.readline()).decode()
            assert f"waiting for PostgreSQL at 127.0.0.1:{port}" in line, line
            server = await proxy(port, database_url)  # the database comes up
            banner = (await process.stdout.readline()).decode()
        found = BANNER.search(banner)
        assert found is not None, banner
        reply = await _chat_once(found.group(1), mint_token(SECRET, "late-db"))
        assert reply["type"] == "reply"
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
        if server is not None:
            server.close()


async def test_embedded_database_that_does_not_start_is_one_line(tmp_path: Path) -> None:
    pgdata = tmp_path / "data" / "pgdata"
    pgdata.mkdir(parents=True)
    (pgdata / "PG_VERSION").write_text("99\n")  # not a data directory PostgreSQL can use
    code, out, err = await run_py(
        "serve", "--data-dir", str(tmp_path / "data"), "--log-level", "WARNING"
    )
    assert (code, out) == (2, "")
    line = one_line(err)
    assert line.startswith(f"error: the embedded PostgreSQL in {pgdata} did not start (")
    assert "postgresql.conf" in line  # what PostgreSQL said
    assert line.endswith(
        f"): see {pgdata}/log; to start afresh, move {pgdata} away (its data goes with it), or"
        " set DATABASE_URL to use another PostgreSQL"
    )


async def test_token_that_creates_the_secret_says_where_and_who_accepts_it(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    code, out, err = await run_py("token", "alice", "--data-dir", str(data_dir))
    assert code == 0
    assert out.count(".") == 2  # a JWT
    assert one_line(err) == (
        f"token: there was no secret yet, so a new one is in {data_dir / 'jwt_secret'}: only a"
        f" server started with --data-dir {data_dir} (or that CHAT_DATA_DIR) will accept this"
        " token"
    )
    code, _, again = await run_py("token", "alice", "--data-dir", str(data_dir))
    assert (code, again) == (0, "")  # the secret is there now: nothing to say


async def test_token_with_the_secret_variable_creates_no_file(tmp_path: Path) -> None:
    env = clean_env(CHAT_JWT_SECRET=SECRET)
    code, out, err = await run_py("token", "alice", "--data-dir", str(tmp_path / "d"), env=env)
    assert (code, err) == (0, "")
    assert not (tmp_path / "d").exists()
    assert jwt.decode(out.strip(), SECRET, algorithms=["HS256"])["sub"] == "alice"


async def test_bots_without_a_server_say_so_in_one_line_and_exit_2() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"ws://127.0.0.1:{port}/ws"
    code, out, err = await run_py("bots", "--url", url, "--duration", "1")
    assert (code, out) == (2, "")
    assert (
        one_line(err)
        == f"bots: cannot connect to {url}: connection refused (is the server running?)"
    )


def test_every_flag_of_every_command_has_a_help_text() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in commands.choices.items():
        for action in command._actions:
            if action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"run.py {name} {action.option_strings or action.dest}"


async def test_top_level_help_shows_the_serve_flags() -> None:
    code, out, _ = await run_py("--help")
    assert code == 0
    for flag in ("--host", "--port", "--data-dir", "--workers", "--generator", "--llm-model"):
        assert flag in out


async def test_ctrl_c_ends_the_wait_for_a_database_at_once(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = clean_env(
        DATABASE_URL=f"postgresql://127.0.0.1:{port}/x",
        CHAT_DB_WAIT_S="60",
        CHAT_JWT_SECRET=SECRET,
    )
    # SIGINT as a terminal sends it, even when this test runs where it is ignored (a job in
    # the background): the disposition is reset before run.py starts
    start = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL);"
        " os.execv(sys.executable, [sys.executable, 'run.py', 'serve', '--port', '0',"
        f" '--data-dir', {str(tmp_path)!r}])"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", start, stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT
    )
    assert process.stderr is not None
    async with asyncio.timeout(30):
        line = (await process.stderr.readline()).decode()
        assert "waiting for PostgreSQL" in line, line
        process.send_signal(signal.SIGINT)
        rest = (await process.stderr.read()).decode()
        assert await process.wait() == 130
    assert "Traceback" not in rest


async def test_port_below_1024_without_root_says_so(tmp_path: Path) -> None:
    line = (
        "cannot listen on port 1: permission denied (ports below 1024 need root): choose"
        " another with --port or CHAT_PORT"
    )
    if os.geteuid() == 0:  # root may listen there: the words, for the error the others get
        assert listen_error(OSError(errno.EACCES, "Permission denied"), "127.0.0.1", 1) == line
        return
    code, out, err = await run_py("serve", "--port", "1", "--data-dir", str(tmp_path))
    assert (code, out, one_line(err)) == (2, "", "error: " + line)


async def test_database_that_does_not_exist_is_one_line_at_once(
    database_url: str, tmp_path: Path
) -> None:
    url = urlunsplit(urlsplit(database_url)._replace(path="/no_such_database"))
    env = clean_env(DATABASE_URL=url, CHAT_DB_WAIT_S="60", CHAT_JWT_SECRET=SECRET)
    code, out, err = await run_py("serve", "--port", "0", "--data-dir", str(tmp_path), env=env)
    assert (code, out) == (2, "")
    line = one_line(err)  # not waited for: waiting cannot make it exist
    assert line.startswith("error: PostgreSQL at ")
    assert line.endswith(
        '/no_such_database: database "no_such_database" does not exist: create it, or name'
        " another database in DATABASE_URL"
    )
