"""The command line: serve (default), token, chat, bots, schema, migrate, personas."""

from __future__ import annotations

import argparse
import asyncio
import errno
import functools
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import orjson

from protocol.schema import json_schema
from server.app import App, run_async, serve_until_signalled
from server.auth import MAX_SUBJECT_CHARS, accepts_hs256, load_or_create_secret, mint_token
from server.embedded import Database, Keeper
from server.logs import OneLineError
from server.personas_cli import add_parser as add_personas_parser
from server.settings import ConfigError, Settings, load_settings
from server.startup import (
    check_data_dir,
    check_database_url,
    check_listen,
    listen_error,
    migrate_when_up,
    page_url,
    wait_for_database,
)
from server.supervisor import (
    Supervisor,
    WorkerFailed,
    metrics_dir,
    remove_metrics_dir,
    reserve_port,
)

log = logging.getLogger("run")

DEFAULT_URL = "ws://127.0.0.1:8765/ws"
CHAT_TOKEN_TTL_S = 24 * 3600  # the token `chat --user` signs


class Parser(argparse.ArgumentParser):
    """Says a usage mistake in one line (and exits 2), as a configuration mistake is said."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}: see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="run.py",
        description="Persona chat server: JSON over WebSocket, backed by PostgreSQL.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the server (the default)")
    _add_server_options(serve)
    serve.add_argument(
        "--workers", type=int, default=1, help="worker processes on one port (default 1)"
    )
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)

    token = commands.add_parser("token", help="print a token for USER")
    token.add_argument("user", help="the user id the token is for (its `sub`)")
    token.add_argument("--ttl", type=float, default=None, help="seconds until it expires")
    token.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)

    migrate = commands.add_parser("migrate", help="apply the database migrations and exit")
    migrate.add_argument(
        "--data-dir", default=None, help="where the embedded PostgreSQL lives (default .data)"
    )
    migrate.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR")

    add_personas_parser(commands)

    commands.add_parser("schema", help="print the JSON Schema of every frame")
    commands.add_parser("openapi", help="print the OpenAPI document of the HTTP API")

    chat = commands.add_parser("chat", help="chat with your avatar in the terminal")
    chat.add_argument("--url", default=DEFAULT_URL, help=f"the server (default {DEFAULT_URL})")
    who = chat.add_mutually_exclusive_group()
    who.add_argument("--user", help="sign in as USER with a token minted from the local secret")
    who.add_argument("--token", help="sign in with this token")
    chat.add_argument(
        "--data-dir", default=None, help="where the local secret and the prompt history live"
    )

    bots = commands.add_parser("bots", help="load-test bots that check persona correctness")
    bots.add_argument(
        "--url",
        action="append",
        default=None,
        help=f"an instance; repeat for several, used round-robin (default {DEFAULT_URL})",
    )
    bots.add_argument(
        "--api-url",
        action="append",
        default=None,
        help="its HTTP API, paired with --url in order (default: the same host, port 8766)",
    )
    bots.add_argument(
        "--run-id", default=None, help="name the run's users: runs with one id share them"
    )
    bots.add_argument(
        "--http-switch-ratio",
        type=float,
        default=0.0,
        help="share of switches made with PATCH /avatars/me/persona (0 to 1; default 0)",
    )
    bots.add_argument(
        "--connect-per-source",
        type=int,
        default=16,
        help="handshakes in flight per source address and instance (default 16)",
    )
    bots.add_argument("--clients", type=int, default=10, help="connections (default 10)")
    bots.add_argument("--duration", type=float, default=10.0, help="seconds of chatting")
    bots.add_argument("--ramp", type=float, default=1.0, help="seconds to open every connection")
    bots.add_argument("--switch-every", type=int, default=5, help="chats between persona switches")
    bots.add_argument("--think", type=float, default=0.0, help="ms between chats; 0: closed loop")
    bots.add_argument("--users", type=int, default=None, help="distinct users (default: one each)")
    bots.add_argument("--secret", default=None, help="the server's JWT secret")
    bots.add_argument("--data-dir", default=None, help="or: the data directory that holds it")
    bots.add_argument("--json", default=None, help="also write the report as JSON to this path")
    bots.add_argument("--quiet", action="store_true", help="no live progress")

    parser.epilog = "With no COMMAND, run.py serves: " + serve.format_help().replace(
        "usage: ", "", 1
    )
    return parser


DATA_DIR_HELP = "the data directory whose secret signs it (default .data): the server's"


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    # No `type=` on settings: the settings object checks them, and says what is wrong in a line.
    parser.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", default=None, help="port (default 8765; 0: any free one)")
    parser.add_argument("--api-port", default=None, help="the HTTP API's port (8766; 0: off)")
    parser.add_argument("--data-dir", default=None, help="data directory (default .data)")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument(
        "--template-delay-ms",
        default=None,
        help="pause between the template generator's pieces, to see streaming without a model",
    )
    parser.add_argument(
        "--allowed-origins",
        nargs="*",
        default=None,
        help="browser origins allowed besides the server's own",
    )
    llm = parser.add_argument_group("reply generator")
    llm.add_argument(
        "--generator",
        default=None,
        help="template (built in, the default) or openai (an OpenAI-compatible endpoint)",
    )
    llm.add_argument("--llm-base-url", default=None, help="e.g. http://127.0.0.1:11434/v1")
    llm.add_argument("--llm-model", default=None, help="the model to ask (default llama3.2)")
    llm.add_argument("--llm-max-tokens", default=None, help="most tokens a reply has (512)")
    llm.add_argument("--llm-temperature", default=None, help="sampling, 0 to 2 (default 0.8)")
    llm.add_argument("--llm-connect-timeout-s", default=None, help="seconds to connect (default 5)")
    llm.add_argument(
        "--llm-first-token-timeout-s", default=None, help="seconds to the first token (60)"
    )
    llm.add_argument(
        "--llm-idle-timeout-s", default=None, help="seconds between two tokens (default 30)"
    )
    llm.add_argument("--history-turns", default=None, help="turns the model sees (default 6)")
    llm.add_argument("--history-chars", default=None, help="characters it sees (default 8000)")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings that flags were given for."""
    overrides: dict[str, Any] = {
        name: value
        for name, value in vars(args).items()
        if value is not None and name in Settings.model_fields
    }
    if isinstance(overrides.get("log_level"), str):
        overrides["log_level"] = overrides["log_level"].upper()
    return overrides


def settings_from(args: argparse.Namespace) -> Settings:
    """Environment settings, overridden by the flags that were given; ConfigError if one is not
    valid."""
    return load_settings(_overrides(args))


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s [%(process)d] %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("websockets").setLevel(logging.WARNING)
    logging.getLogger("asyncpg.pool").addFilter(OneLineError())  # reconnects while it is down


def cmd_serve(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    configure_logging(settings.log_level)
    if args.worker:
        return _serve_worker(settings)
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers} is not valid: set --workers to 1 or more")
    if settings.database_url is not None:
        check_database_url(settings.database_url)
    if settings.database_url is None or settings.jwt_secret is None:
        check_data_dir(settings.data_dir)  # the embedded database or the secret lives there
    check_listen(settings.host, settings.port)
    if settings.api_port:
        check_listen(settings.host, settings.api_port, "--api-port")
    secret = load_or_create_secret(settings)
    database = Database(settings.database_url, settings.pgdata_path())
    with database as dsn:
        if args.workers > 1:
            return _serve_workers(args, settings, dsn, secret, database.keeper())
        app = App(settings, dsn, secret)
        try:
            run_async(_serve(app, dsn, settings, database.keeper()))
        except OSError as exc:  # taken between the check and the start
            if exc.errno not in BIND_ERRORS:
                raise
            raise ConfigError(listen_error(exc, settings.host, settings.port)) from None
    return 0


BIND_ERRORS = (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL)


async def _serve(app: App, dsn: str, settings: Settings, keeper: Keeper | None) -> None:
    # Wait for the database before SIGINT and SIGTERM are taken over for the drain: Ctrl-C
    # then ends a wait for a database that does not come.
    await wait_for_database(dsn, settings)
    await serve_until_signalled(app, lambda app: _banner(app.port, settings), keeper)


def _serve_worker(settings: Settings) -> int:
    """One worker of `serve --workers N`: its settings come from the supervisor's environment."""
    if not settings.database_url or settings.jwt_secret is None:
        raise ConfigError("--worker is started by `serve --workers N`, not by hand")

    def ready(app: App) -> None:
        print("ready", flush=True)

    app = App(settings, settings.database_url, settings.jwt_secret.get_secret_value())
    run_async(serve_until_signalled(app, ready))
    return 0


def _serve_workers(
    args: argparse.Namespace, settings: Settings, dsn: str, secret: str, keeper: Keeper | None
) -> int:
    """Migrate once, hold the port, and run `args.workers` workers under a supervisor (which
    also keeps the embedded database running, if there is one)."""
    asyncio.run(migrate_when_up(dsn, settings))
    try:
        holder = reserve_port(settings.host, settings.port)
    except OSError as exc:
        raise ConfigError(listen_error(exc, settings.host, settings.port)) from None
    port = holder.getsockname()[1]
    metrics_path = metrics_dir()
    env = {
        **os.environ,
        **{f"CHAT_{k.upper()}": _env_value(v) for k, v in _overrides(args).items()},
        "DATABASE_URL": dsn,
        "CHAT_JWT_SECRET": secret,
        "CHAT_PORT": str(port),
        "CHAT_REUSE_PORT": "true",
        "CHAT_RUN_MIGRATIONS": "false",
        "CHAT_JWT_HS256": "true" if accepts_hs256(settings) else "false",  # always given a secret
        "PROMETHEUS_MULTIPROC_DIR": metrics_path,
    }
    supervisor = Supervisor(
        [sys.executable, str(Path(__file__).resolve()), "serve", "--worker"],
        env,
        args.workers,
        settings.drain_timeout_s,
        metrics_path,
        keeper,
    )
    try:
        return supervisor.run(lambda: _banner(port, settings, args.workers))
    except WorkerFailed as exc:  # the worker said why on stderr, above
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        holder.close()
        remove_metrics_dir(metrics_path)


def _env_value(value: object) -> str:
    return orjson.dumps(value).decode() if isinstance(value, list) else str(value)


def _banner(port: int, settings: Settings, workers: int = 1) -> None:
    where = (
        "PostgreSQL at DATABASE_URL"
        if settings.database_url
        else f"embedded PostgreSQL in {settings.pgdata_path().resolve()}"
    )
    data_dir = f" --data-dir {settings.data_dir}" if settings.data_dir != Path(".data") else ""
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(
        f"Persona chat server listening on ws://{host}:{port}/ws"
        + (f" ({workers} workers)" if workers > 1 else "")
        + "\n"
        f"  web page:     {page_url(settings.host, port)}\n"
        f"  get a token:  python run.py token alice{data_dir}\n"
        f"  data:         {settings.data_dir.resolve()} ({where})\n"
        f"  health:       http://{host}:{port}/healthz\n"
        "  stop:         Ctrl-C",
        flush=True,
    )


def secret_for_tokens(settings: Settings, command: str) -> str:
    """The secret tokens are signed with: CHAT_JWT_SECRET, else the data directory's. When
    there is neither, one is created there, and that is said: only a server that uses this
    data directory will accept what it signs."""
    if settings.jwt_secret is not None:
        return settings.jwt_secret.get_secret_value()
    path = settings.secret_path()
    created = not path.exists()
    if created:
        check_data_dir(settings.data_dir)
    try:
        secret = load_or_create_secret(settings)
    except OSError as exc:
        raise ConfigError(
            f"cannot read the secret {path} ({(exc.strerror or str(exc)).lower()}): fix it, or "
            "set CHAT_JWT_SECRET"
        ) from None
    if created:
        print(
            f"{command}: there was no secret yet, so a new one is in {path.resolve()}: only a "
            f"server started with --data-dir {settings.data_dir} (or that CHAT_DATA_DIR) will "
            "accept this token",
            file=sys.stderr,
        )
    return secret


def cmd_token(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if not 1 <= len(args.user) <= MAX_SUBJECT_CHARS:
        raise ConfigError(f"USER must have 1 to {MAX_SUBJECT_CHARS} characters")
    print(mint_token(secret_for_tokens(settings, "token"), args.user, args.ttl))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    configure_logging(settings.log_level)
    if settings.database_url is None:
        check_data_dir(settings.data_dir)
    else:
        check_database_url(settings.database_url)
    with Database(settings.database_url, settings.pgdata_path()) as dsn:
        applied = asyncio.run(migrate_when_up(dsn, settings))
    print("applied: " + ", ".join(applied) if applied else "the schema is up to date")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    sys.stdout.write(orjson.dumps(json_schema(), option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def cmd_openapi(args: argparse.Namespace) -> int:
    from server.app import server_version
    from server.http_api import openapi_schema

    document = openapi_schema(server_version())
    sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from clients.terminal import main as chat_main

    settings = settings_from(args)
    check_data_dir(settings.data_dir)  # the prompt history lives there

    def token_for(user: str) -> str:  # for --user: signed with the local server's secret
        return mint_token(secret_for_tokens(settings, "chat"), user, CHAT_TOKEN_TTL_S)

    return chat_main(args, token_for, settings.data_dir)


def cmd_bots(args: argparse.Namespace) -> int:
    from clients.bots.cli import main as bots_main

    secret = args.secret or _existing_secret(settings_from(args))
    return bots_main(args, functools.partial(mint_token, secret) if secret else None)


def _existing_secret(settings: Settings) -> str | None:
    """CHAT_JWT_SECRET, else the data directory's secret file; None (nothing created) if neither."""
    if settings.jwt_secret is not None:
        return settings.jwt_secret.get_secret_value()
    path = settings.secret_path()
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def cmd_personas(args: argparse.Namespace) -> int:
    from server.personas_cli import main as personas_main

    return personas_main(args, settings_from(args))


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": cmd_serve,
    "token": cmd_token,
    "migrate": cmd_migrate,
    "schema": cmd_schema,
    "openapi": cmd_openapi,
    "chat": cmd_chat,
    "bots": cmd_bots,
    "personas": cmd_personas,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; a configuration mistake ends in one line on stderr and exit status 2."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "serve")
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before serving, e.g. while waiting for the database
        return 130


if __name__ == "__main__":
    sys.exit(main())
