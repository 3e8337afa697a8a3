"""Start-up checks that end a mistake in one line (ConfigError): the data directory, the address
to listen on, and the database, which is waited for while it is not up yet."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

import asyncpg

from server.settings import ConfigError, Settings
from server.store import Store

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_RETRY_S = 0.5
MAX_RETRY_S = 5.0
URL_FORM = "postgresql://USER:PASSWORD@HOST:5432/DATABASE"
DATA_DIR_FIX = "choose another with --data-dir or CHAT_DATA_DIR"


def check_data_dir(path: Path) -> None:
    """Create the data directory if need be, and make sure this process can write in it."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"the data directory {path} is not a directory: {DATA_DIR_FIX}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the data directory {path} ({_reason(exc)}): {DATA_DIR_FIX}"
        ) from None
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConfigError(
            f"the data directory {path} is not writable ({_reason(exc)}): make it writable for "
            f"this user, or {DATA_DIR_FIX}"
        ) from None


def check_listen(host: str, port: int, flag: str = "--port") -> None:
    """Make sure `host`:`port` can be listened on (as the server will: SO_REUSEADDR) before
    anything is started; ConfigError that says why not (and names `flag` and its variable)."""
    where = f"{host}:{port}"
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        raise ConfigError(
            f"cannot listen on {host}: unknown host: set --host or CHAT_HOST to an address of "
            "this machine, such as 127.0.0.1 or 0.0.0.0"
        ) from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise ConfigError(listen_error(exc, host, port, flag)) from None
    log.debug("%s is free", where)


def listen_error(exc: OSError, host: str, port: int, flag: str = "--port") -> str:
    """Why the server cannot listen on `host`:`port`, and what to do about it."""
    variable = "CHAT_" + flag.removeprefix("--").replace("-", "_").upper()
    if exc.errno == errno.EADDRINUSE:
        return (
            f"port {port} on {host} is in use (another server?): stop it, or choose another "
            f"port with {flag} or {variable} (0 picks a free one)"
        )
    if exc.errno == errno.EACCES:
        return (
            f"cannot listen on port {port}: permission denied (ports below 1024 need root): "
            f"choose another with {flag} or {variable}"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return (
            f"cannot listen on {host}: it is not an address of this machine: set --host or "
            "CHAT_HOST to one that is, such as 127.0.0.1 or 0.0.0.0"
        )
    return (
        f"cannot listen on {host}:{port} ({_reason(exc)}): choose another address with "
        f"--host and {flag} (or CHAT_HOST and {variable})"
    )


def page_url(host: str, port: int) -> str:
    """The web page's address for a server listening on `host`:`port` (on every address: the
    loopback one, which works on this machine)."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def database_place(dsn: str) -> str:
    """Where a database URL points, without its user or password: `HOST:PORT/DATABASE`."""
    parts = urlsplit(dsn)
    host = parts.hostname or parse_qs(parts.query).get("host", ["localhost"])[0]
    try:
        port = parts.port or 5432
    except ValueError:
        port = 5432
    return f"{host}:{port}{parts.path or '/'}"


def check_database_url(dsn: str) -> None:
    """A URL asyncpg can use, or ConfigError (which never shows the password)."""
    try:
        parts = urlsplit(dsn)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        raise ConfigError(f"DATABASE_URL is malformed: write it as {URL_FORM}") from None
    if parts.scheme not in ("postgresql", "postgres"):
        got = f"{parts.scheme}://" if parts.scheme else "no scheme"
        raise ConfigError(
            f"DATABASE_URL is not a PostgreSQL URL (it has {got}): write it as {URL_FORM}"
        )


async def when_database_is_up(
    attempt: Callable[[], Awaitable[T]], dsn: str, wait_s: float, embedded: bool = False
) -> T:
    """Run `attempt` (which connects to `dsn`) until the database answers, trying again with
    backoff (0.5 s doubling to 5 s, one log line per try) for `wait_s` seconds; ConfigError
    when it does not come up in that time, or refuses for a reason that waiting cannot fix."""
    check_database_url(dsn)
    place = database_place(dsn)
    name = "the embedded PostgreSQL" if embedded else f"PostgreSQL at {place}"
    loop = asyncio.get_running_loop()
    started = loop.time()
    delay = FIRST_RETRY_S
    tries = 0
    while True:
        tries += 1
        try:
            return await attempt()
        except (asyncpg.ClientConfigurationError, ValueError):
            raise ConfigError(f"DATABASE_URL is malformed: write it as {URL_FORM}") from None
        except (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidPasswordError) as e:
            raise ConfigError(
                f"{name} refused the sign-in ({e}): check the user and password in DATABASE_URL"
            ) from None
        except asyncpg.InvalidCatalogNameError as exc:
            raise ConfigError(
                f"{name}: {exc}: create it, or name another database in DATABASE_URL"
            ) from None
        except (OSError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError) as exc:
            why = unreachable_reason(exc, urlsplit(dsn).hostname)
            waited = loop.time() - started
            if waited >= wait_s:
                fix = (
                    f"see {name}'s log"
                    if embedded
                    else "check that it runs and that DATABASE_URL names it, or set "
                    "CHAT_DB_WAIT_S to wait longer"
                )
                tried = f" (waited {waited:.0f} s, {tries} tries)" if tries > 1 else ""
                raise ConfigError(f"cannot reach {name}: {why}{tried}: {fix}") from None
            pause = min(delay, wait_s - waited)
            log.warning(
                "waiting for %s: %s; try %d, the next in %.1f s (giving up after %g s)",
                name, why, tries, pause, wait_s,
            )  # fmt: skip
            await asyncio.sleep(pause)
            delay = min(delay * 2, MAX_RETRY_S)
        except asyncpg.PostgresError as exc:
            raise ConfigError(f"{name} refused the connection: {exc}: check DATABASE_URL") from None


def unreachable_reason(exc: BaseException, host: str | None) -> str:
    """Why a connection could not be made, in a few words."""
    if isinstance(exc, socket.gaierror):
        return f"unknown host {host}"
    if isinstance(exc, ConnectionRefusedError) or "Connect call failed" in str(exc):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "no answer in time (CHAT_DB_TIMEOUT_S)"
    if isinstance(exc, asyncpg.PostgresError):
        return f"not ready ({exc})"
    return _reason(exc) if isinstance(exc, OSError) else str(exc)


async def connect_store(
    dsn: str, settings: Settings, on_batch: Callable[[int], object] | None = None
) -> Store:
    """The store's pool, once the database answers: an external one (`DATABASE_URL`) is waited
    for `db_wait_s`; the embedded one, started by this process, is not."""
    size = settings.db_pool_min, max(settings.db_pool_min, settings.db_pool_max)
    return await _store_when_up(dsn, settings, size, on_batch)


async def wait_for_database(dsn: str, settings: Settings) -> None:
    """Return once the database answers (as `connect_store` waits for it)."""
    await (await _store_when_up(dsn, settings)).close()


async def migrate_when_up(dsn: str, settings: Settings) -> list[str]:
    """Apply pending migrations (a short-lived pool), once the database answers."""
    store = await _store_when_up(dsn, settings)
    try:
        return await store.migrate()
    finally:
        await store.close()


async def _store_when_up(
    dsn: str,
    settings: Settings,
    size: tuple[int, int] = (1, 1),
    on_batch: Callable[[int], object] | None = None,
) -> Store:
    def connect() -> Awaitable[Store]:
        return Store.connect(
            dsn,
            min_size=size[0],
            max_size=size[1],
            timeout_s=settings.db_timeout_s,
            on_batch=on_batch,
        )

    external = settings.database_url is not None
    wait_s = settings.db_wait_s if external else 0.0
    return await when_database_is_up(connect, dsn, wait_s, embedded=not external)


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()
