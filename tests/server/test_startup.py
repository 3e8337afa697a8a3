"""Start-up checks in process: invalid settings, the data directory, the address, the wait for
the database and an embedded PostgreSQL that does not start, each a one-line ConfigError."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Literal, get_origin

import pytest

from server.embedded import EmbeddedPostgres
from server.settings import ConfigError, Settings, env_name, load_settings
from server.startup import (
    check_data_dir,
    check_listen,
    connect_store,
    database_place,
    page_url,
    when_database_is_up,
)
from server.store import Store
from tests.conftest import settings_for_tests


def checked_fields() -> list[str]:
    """Every setting whose type refuses some text: numbers, switches, choices."""
    return [
        name
        for name, field in Settings.model_fields.items()
        if field.annotation in (int, float, bool) or get_origin(field.annotation) is Literal
    ]


@pytest.mark.parametrize("name", checked_fields())
def test_every_invalid_variable_is_named_with_its_fix_in_one_line(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    variable = env_name(name)
    monkeypatch.setenv(variable, "not-a-value")
    with pytest.raises(ConfigError) as raised:
        load_settings()
    line = str(raised.value)
    assert "\n" not in line
    assert line.startswith(f"{variable}=not-a-value is not ")
    assert f": set {variable} to " in line


@pytest.mark.parametrize("url", ["ftp://u:hunter2@llm.example/v1", "localhost:11434/v1", "http://"])
def test_an_llm_url_that_is_not_http_is_named_without_its_password(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHAT_LLM_BASE_URL", url)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    line = str(raised.value)
    assert line.endswith(
        "is not valid: set CHAT_LLM_BASE_URL to an http(s) URL, e.g. http://127.0.0.1:11434/v1"
    )
    assert line.startswith("CHAT_LLM_BASE_URL=") and "hunter2" not in line


def test_a_flag_is_named_as_the_flag_and_other_mistakes_are_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHAT_GENERATOR", "gpt")
    with pytest.raises(ConfigError) as raised:
        load_settings({"port": "abc", "data_dir": "/tmp/x"})
    assert str(raised.value) == (
        "--port abc is not a valid port: set --port to a number from 0 to 65535"
        " (also not valid: CHAT_GENERATOR)"
    )


def test_valid_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHAT_PORT", "9000")
    assert load_settings({"port": "9001"}).port == 9001
    assert load_settings().port == 9000


def test_data_dir_is_created_when_missing(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b"
    check_data_dir(path)
    assert path.is_dir()


def test_data_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(ConfigError, match="is not a directory: choose another with --data-dir"):
        check_data_dir(path)


def test_data_dir_that_cannot_be_written_is_refused(tmp_path: Path) -> None:
    path = Path("/sys") if os.geteuid() == 0 else tmp_path / "read-only"
    if path != Path("/sys"):
        path.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match=r"is not writable \(permission denied\)"):
        check_data_dir(path)


def test_a_port_in_use_is_refused_and_a_free_one_is_not() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is in use"):
            check_listen("127.0.0.1", port)
        with pytest.raises(ConfigError, match="--api-port or CHAT_API_PORT"):
            check_listen("127.0.0.1", port, "--api-port")
    check_listen("127.0.0.1", port)  # free again
    check_listen("127.0.0.1", 0)


def test_an_address_of_another_machine_is_refused() -> None:
    with pytest.raises(ConfigError, match="it is not an address of this machine"):
        check_listen("192.0.2.1", 0)  # TEST-NET-1: never this machine's
    with pytest.raises(ConfigError, match=r"cannot listen on nohost\.invalid: unknown host"):
        check_listen("nohost.invalid", 0)


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8765/"),
        ("0.0.0.0", "http://127.0.0.1:8765/"),
        ("::", "http://[::1]:8765/"),
        ("::1", "http://[::1]:8765/"),
        ("chat.example.com", "http://chat.example.com:8765/"),
    ],
)
def test_page_url_is_one_a_browser_on_this_machine_can_open(host: str, url: str) -> None:
    assert page_url(host, 8765) == url


def test_database_place_never_shows_the_user_or_password() -> None:
    assert database_place("postgresql://u:hunter2@db.internal:6543/chat") == "db.internal:6543/chat"
    assert database_place("postgresql://postgres:@/postgres?host=/tmp/s") == "/tmp/s:5432/postgres"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_refused_database_is_tried_again_with_a_log_line_each_then_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"postgresql://u:hunter2@127.0.0.1:{free_port()}/x"
    with caplog.at_level(logging.WARNING, "server.startup"), pytest.raises(ConfigError) as raised:
        await when_database_is_up(lambda: Store.connect(url, min_size=1, max_size=1), url, 0.6)
    tries = [r.getMessage() for r in caplog.records if r.name == "server.startup"]
    assert len(tries) == 2  # at 0 s and 0.5 s, then the last at 0.6 s
    assert tries[0].endswith("connection refused; try 1, the next in 0.5 s (giving up after 0.6 s)")
    assert tries[1].endswith("connection refused; try 2, the next in 0.1 s (giving up after 0.6 s)")
    assert "hunter2" not in str(raised.value) + "".join(tries)
    assert str(raised.value).startswith("cannot reach PostgreSQL at 127.0.0.1:")
    assert "connection refused (waited 1 s, 3 tries)" in str(raised.value)


async def test_store_connects_at_once_when_the_database_is_up(database_url: str) -> None:
    settings = settings_for_tests(database_url=database_url, db_wait_s=0)
    store = await connect_store(database_url, settings)
    try:
        assert await store.ping()
    finally:
        await store.close()


def test_embedded_database_that_does_not_start_says_what_postgres_said(tmp_path: Path) -> None:
    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    (pgdata / "PG_VERSION").write_text("99\n")
    with pytest.raises(ConfigError) as raised:
        EmbeddedPostgres(pgdata).start()
    line = str(raised.value)
    assert "\n" not in line
    assert line.startswith(f"the embedded PostgreSQL in {pgdata} did not start (postgres: ")
    assert f"see {pgdata}/log; to start afresh, move {pgdata} away" in line
