"""The command line: serve (default), token, chat, bots, schema, migrate."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from protocol.schema import json_schema
from server.app import App, run_async, serve_until_signalled
from server.auth import accepts_hs256, load_or_create_secret, mint_token
from server.embedded import Database, Keeper
from server.logs import OneLineError
from server.settings import Settings
from server.store import migrate_database
from server.supervisor import Supervisor, metrics_dir, remove_metrics_dir, reserve_port

log = logging.getLogger("run")

DEFAULT_URL = "ws://127.0.0.1:8765/ws"
CHAT_TOKEN_TTL_S = 24 * 3600  # the token `chat --user` signs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run.py", description="Persona chat server: JSON over WebSocket, backed by PostgreSQL."
    )
    commands = parser.add_subparsers(dest="command")

    serve = commands.add_parser("serve", help="run the server (the default)")
    _add_server_options(serve)
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)

    token = commands.add_parser("token", help="print a token for USER")
    token.add_argument("user")
    token.add_argument("--ttl", type=float, default=None, help="seconds until it expires")
    token.add_argument("--data-dir", default=None)

    migrate = commands.add_parser("migrate", help="apply the database migrations and exit")
    migrate.add_argument("--data-dir", default=None)
    migrate.add_argument("--log-level", default=None)

    commands.add_parser("schema", help="print the JSON Schema of every frame")
    commands.add_parser("openapi", help="print the OpenAPI document of the HTTP API")

    chat = commands.add_parser("chat", help="chat with your avatar in the terminal")
    chat.add_argument("--url", default=DEFAULT_URL)
    who = chat.add_mutually_exclusive_group()
    who.add_argument("--user", help="sign in as USER with a token minted from the local secret")
    who.add_argument("--token", help="sign in with this token")
    chat.add_argument("--data-dir", default=None, help="where the local secret lives")

    bots = commands.add_parser("bots", help="load-test bots that check persona correctness")
    bots.add_argument("--url", default=DEFAULT_URL)
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
    return parser


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default 8765)")
    parser.add_argument("--api-port", default=None, help="the HTTP API's port (8766; 0: off)")
    parser.add_argument("--data-dir", default=None, help="data directory (default .data)")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument(
        "--template-delay-ms",
        type=float,
        default=None,
        help="pause between the template generator's pieces, to see streaming without a model",
    )
    parser.add_argument("--allowed-origins", nargs="*", default=None, help="extra browser origins")
    llm = parser.add_argument_group("reply generator")
    llm.add_argument("--generator", choices=["template", "openai"], default=None)
    llm.add_argument("--llm-base-url", default=None, help="e.g. http://127.0.0.1:11434/v1")
    llm.add_argument("--llm-model", default=None)
    llm.add_argument("--llm-max-tokens", type=int, default=None)
    llm.add_argument("--llm-temperature", type=float, default=None)
    llm.add_argument("--llm-connect-timeout-s", type=float, default=None)
    llm.add_argument("--llm-first-token-timeout-s", type=float, default=None)
    llm.add_argument("--llm-idle-timeout-s", type=float, default=None)
    llm.add_argument("--history-turns", type=int, default=None, help="turns the model sees")
    llm.add_argument("--history-chars", type=int, default=None, help="characters it sees")


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
    """Environment settings, overridden by the flags that were given."""
    return Settings(**_overrides(args))


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
    secret = load_or_create_secret(settings)
    database = Database(settings.database_url, settings.pgdata_path())
    with database as dsn:
        if args.workers > 1:
            return _serve_workers(args, settings, dsn, secret, database.keeper())
        app = App(settings, dsn, secret)
        run_async(
            serve_until_signalled(
                app, lambda app: _banner(app.url, app.port, settings), database.keeper()
            )
        )
    return 0


def _serve_worker(settings: Settings) -> int:
    """One worker of `serve --workers N`: its settings come from the supervisor's environment."""
    if not settings.database_url or settings.jwt_secret is None:
        raise SystemExit("--worker is started by `serve --workers N`, not by hand")

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
    asyncio.run(migrate_database(dsn, settings.db_timeout_s))
    holder = reserve_port(settings.host, settings.port)
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
    url = f"ws://{settings.host}:{port}/ws"
    try:
        return supervisor.run(lambda: _banner(url, port, settings, args.workers))
    finally:
        holder.close()
        remove_metrics_dir(metrics_path)


def _env_value(value: object) -> str:
    return orjson.dumps(value).decode() if isinstance(value, list) else str(value)


def _banner(url: str, port: int, settings: Settings, workers: int = 1) -> None:
    where = (
        "PostgreSQL at DATABASE_URL"
        if settings.database_url
        else f"embedded PostgreSQL in {settings.pgdata_path().resolve()}"
    )
    print(
        f"Persona chat server listening on {url}"
        + (f" ({workers} workers)" if workers > 1 else "")
        + "\n"
        "  get a token:  python run.py token alice"
        + (f" --data-dir {settings.data_dir}" if settings.data_dir != Settings().data_dir else "")
        + f"\n  data:         {settings.data_dir.resolve()} ({where})\n"
        f"  health:       http://{settings.host}:{port}/healthz\n"
        "  stop:         Ctrl-C",
        flush=True,
    )


def cmd_token(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    print(mint_token(load_or_create_secret(settings), args.user, args.ttl))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    configure_logging(settings.log_level)

    with Database(settings.database_url, settings.pgdata_path()) as dsn:
        applied = asyncio.run(migrate_database(dsn, settings.db_timeout_s))
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

    def token_for(user: str) -> str:  # for --user: signed with the local server's secret
        return mint_token(load_or_create_secret(settings), user, CHAT_TOKEN_TTL_S)

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


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": cmd_serve,
    "token": cmd_token,
    "migrate": cmd_migrate,
    "schema": cmd_schema,
    "openapi": cmd_openapi,
    "chat": cmd_chat,
    "bots": cmd_bots,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "serve")
    args = parser.parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
