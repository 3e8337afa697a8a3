"""`run.py personas ...`: the catalogue from the command line (list, show, export, import,
enable, disable, remove), against the server's database. The operations are
server/personas_admin.py's; this reads the arguments and prints.

Exit status: 0 done; 1 a bad card, an operation refused, a database that is down, or an edit
committed that a server process did not confirm in time; 2 a usage mistake."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol.text import printable
from server.settings import ConfigError, Settings
from server.startup import check_data_dir, check_database_url, when_database_is_up

if TYPE_CHECKING:
    import asyncpg

    from protocol.cards import ParsedCard
    from server.personas_admin import Outcome

DEFAULT_TIMEOUT_S = 5.0
APPLICATION_NAME = "persona-chat-cli"  # not a listener's name: it confirms nothing

EPILOG = """\
Each edit (import, enable, disable, remove) is one transaction. Once it is committed, the
command waits for every server process using the database to confirm that it has the new
catalogue (--timeout, default 5 s): after that, no reply on any process uses the old card.

exit status: 0 done; 1 a bad card (one line: the file and the field path), a refusal, a
database that is down, or an edit that a server process did not confirm in time (the edit is
committed); 2 a usage mistake. See docs/cards.md."""


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, not {text!r}") from None
    if not 0 < value <= 600:
        raise argparse.ArgumentTypeError("expected seconds above 0 (at most 600)")
    return value


def add_parser(commands: Any) -> None:
    """The `personas` command and its actions, on run.py's subparsers."""
    personas = commands.add_parser(
        "personas",
        help="list, show, import, export, enable, disable or remove personas (character cards)",
        description="The persona catalogue: character cards in the server's database.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = personas.add_subparsers(
        dest="action", metavar="ACTION", required=True, help="what to do with the catalogue"
    )

    def action(name: str, help: str, edit: bool = False) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, help=help, description=help)
        parser.add_argument(
            "--data-dir", default=None, help="the server's data directory (default .data)"
        )
        parser.add_argument(
            "--database-url", default=None, help="a PostgreSQL URL (default: DATABASE_URL)"
        )
        if edit:
            parser.add_argument(
                "--timeout",
                type=_timeout,
                default=DEFAULT_TIMEOUT_S,
                help="seconds to wait for every server process to confirm (default 5)",
            )
        return parser

    action("list", "a table of the personas: id, name, version, enabled, avatars using it")
    action("show", "a persona's card: its main fields and the catalogue's").add_argument("id")
    export = action("export", "print a persona's card as JSON, or write it to a file")
    export.add_argument("id")
    export.add_argument(
        "--format",
        choices=("v2", "v3", "project"),
        default=None,
        help="Character Card V2 or V3, or this project's card file (id, enabled and the V3 "
        "card); default: the spec it was imported in (V3 for a V1 card)",
    )
    export.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help="write it to FILE instead of printing it; a FILE ending in .png gets a PNG card "
        "(the V3 card in its ccv3 chunk and a V2 copy in chara, whatever --format says)",
    )
    imports = action(
        "import",
        "import cards: V2 or V3 JSON, PNG cards, or this project's card files (JSON or TOML)",
        edit=True,
    )
    imports.add_argument("files", nargs="+", metavar="FILE")
    imports.add_argument(
        "--id",
        default=None,
        help="the persona's id (one FILE only; default: the file's id, else a slug of the name)",
    )
    imports.add_argument(
        "--replace",
        action="store_true",
        help="overwrite a persona of the same id (a new version; it keeps its enabled flag)",
    )
    imports.add_argument(
        "--dry-run", action="store_true", help="check everything and say what would happen"
    )
    action("enable", "enable a persona: users can pick it", edit=True).add_argument("id")
    action(
        "disable", "disable a persona: its avatars' chats answer persona_unavailable", edit=True
    ).add_argument("id")
    removal = action(
        "remove",
        "remove a persona (refused while avatars use it, unless they are reassigned)",
        edit=True,
    )
    removal.add_argument("id")
    removal.add_argument(
        "--reassign",
        default=None,
        metavar="OTHER",
        help="move the avatars that use it to OTHER (an enabled persona): a persona switch "
        "that their users' open sessions are told of",
    )


class Failed(Exception):
    """Said in one line on stderr; exit status 1."""


def main(args: argparse.Namespace, settings: Settings) -> int:
    """Run `personas ACTION`; ConfigError (exit 2) for a configuration mistake."""
    logging.getLogger("server").setLevel(logging.WARNING)
    if settings.database_url is not None:
        check_database_url(settings.database_url)
    try:
        cards = _read_cards(args.files) if args.action == "import" else []
        if settings.database_url is None:
            _check_embedded(settings)
        return _with_database(args, settings, cards)
    except Failed as exc:
        _error(str(exc))
        return 1


def _error(line: str) -> None:
    print(f"error: {line}", file=sys.stderr, flush=True)


def _check_embedded(settings: Settings) -> None:
    if not (settings.pgdata_path() / "PG_VERSION").exists():
        raise Failed(
            f"there is no database in {settings.data_dir} yet: start the server once (or run "
            "`python run.py migrate`) with this --data-dir, or set DATABASE_URL"
        )
    check_data_dir(settings.data_dir)


def _read_cards(files: Sequence[str]) -> list[tuple[str, ParsedCard]]:
    """Every file's card; Failed after saying every bad one (nothing is imported then)."""
    from protocol.cards import CardError
    from server.card_files import read_card_file

    cards: list[tuple[str, ParsedCard]] = []
    bad = 0
    for name in files:
        try:
            cards.append((name, read_card_file(name)))
        except CardError as exc:
            _error(str(exc))
            bad += 1
    if bad:
        raise Failed(
            f"{bad} of {len(files)} files {'is' if bad == 1 else 'are'} not a valid card: "
            "nothing was imported"
        )
    return cards


def _with_database(
    args: argparse.Namespace, settings: Settings, cards: list[tuple[str, ParsedCard]]
) -> int:
    from server.embedded import Database

    try:
        with Database(settings.database_url, settings.pgdata_path()) as dsn:
            return asyncio.run(_run(args, settings, dsn, cards))
    except ConfigError as exc:  # the database is not there: not a usage mistake
        raise Failed(str(exc)) from None


async def _run(
    args: argparse.Namespace, settings: Settings, dsn: str, cards: list[tuple[str, ParsedCard]]
) -> int:
    import asyncpg

    from server.personas_admin import AdminError, check_schema

    def connect() -> Any:
        return asyncpg.connect(
            dsn,
            timeout=settings.db_timeout_s,
            server_settings={"application_name": APPLICATION_NAME},
        )

    # A command fails at once when the database is down, unless CHAT_DB_WAIT_S says to wait.
    wait_s = settings.db_wait_s if "db_wait_s" in settings.model_fields_set else 0.0
    conn: asyncpg.Connection = await when_database_is_up(
        connect, dsn, wait_s, embedded=settings.database_url is None
    )
    try:
        await check_schema(conn)
        status: int = await ACTIONS[args.action](conn, args, cards)
        return status
    except AdminError as exc:
        raise Failed(str(exc)) from None
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise Failed(f"the database failed: {_one_line(exc)}") from None
    finally:
        await _close(conn)


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await asyncio.wait_for(conn.close(), 5)
    except Exception:  # broken or gone: nothing is left to say to it
        conn.terminate()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ------------------------------------------------------------------------------ the actions


async def _list(conn: asyncpg.Connection, args: argparse.Namespace, _cards: object) -> int:
    from server.personas_admin import list_personas

    rows = await list_personas(conn)
    table = [("ID", "NAME", "VERSION", "ENABLED", "AVATARS")] + [
        (r.id, _clip(r.name, 40), str(r.version), "yes" if r.enabled else "no", str(r.avatars))
        for r in rows
    ]
    enabled = sum(r.enabled for r in rows)
    total = f"{_count(len(rows), 'persona')}, {enabled} enabled"
    if sys.stdout.isatty():  # a table for the eye; plain aligned columns for a pipe
        _rich_table(table, total)
        return 0
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    for row in table:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(width) for cell, width in zip(row[2:], widths[2:], strict=True)]
        print(printable("  ".join(cells).rstrip()))
    print(total)
    return 0


def _rich_table(table: Sequence[tuple[str, ...]], total: str) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    view = Table(caption=total)
    for i, title in enumerate(table[0]):
        view.add_column(title, justify="right" if i >= 2 else "left", no_wrap=i == 0)
    for row in table[1:]:  # a card's text is not rich markup ("[bold]" in a name stays)
        cells = [Text(printable(cell)) for cell in row]
        view.add_row(*cells, style=None if row[3] == "yes" else "dim")
    Console().print(view)


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


async def _show(conn: asyncpg.Connection, args: argparse.Namespace, _cards: object) -> int:
    from server.personas_admin import get_persona

    persona = await get_persona(conn, args.id)
    data = persona.card.data
    book = data.character_book
    extensions = data.extensions or {}
    fields: list[tuple[str, str]] = [
        ("id", persona.id),
        ("name", data.name),
        ("spec", f"{persona.spec.upper()} (kept as written)"),
        ("version", str(persona.version)),
        ("enabled", "yes" if persona.enabled else "no"),
        ("avatars", str(persona.avatars)),
        ("created", persona.created_at.isoformat(timespec="seconds")),
        ("updated", persona.updated_at.isoformat(timespec="seconds")),
        ("description", data.description),
        ("personality", data.personality),
        ("scenario", data.scenario),
        ("first_mes", data.first_mes),
        ("alternate_greetings", str(len(data.alternate_greetings or []))),
        ("mes_example", data.mes_example),
        ("system_prompt", data.system_prompt),
        ("post_history_instructions", data.post_history_instructions),
        ("creator_notes", data.creator_notes),
        ("tags", ", ".join(data.tags or [])),
        ("creator", data.creator),
        ("character_version", data.character_version),
        ("character_book", _count(len(book.entries), "entry") if book is not None else ""),
        ("extensions", ", ".join(extensions)),
    ]
    if persona.card.material is not None:
        given = persona.card.material.model_dump(exclude_none=True)
        fields.append(("template material", ", ".join(given)))
    width = max(len(key) for key, _ in fields) + 2
    for key, value in fields:
        lines = value.splitlines() or [""]
        print(printable(f"{key + ':':<{width}}{lines[0]}".rstrip()))
        for line in lines[1:]:
            print(printable(f"{'':<{width}}{line}".rstrip()))
    return 0


async def _export(conn: asyncpg.Connection, args: argparse.Namespace, _cards: object) -> int:
    from protocol.cards import export_card, export_project
    from server.card_files import write_png_card
    from server.personas_admin import get_persona

    persona = await get_persona(conn, args.id)
    parsed = persona.card
    target = args.format or (parsed.spec if parsed.spec != "v1" else "v3")
    if args.out is not None and args.out.lower().endswith(".png"):
        try:
            await asyncio.to_thread(write_png_card, args.out, parsed)
        except (OSError, ValueError) as exc:
            raise Failed(f"cannot write {args.out}: {_os_reason(exc)}") from None
        print(f"{persona.id}: written to {args.out} (a PNG card: V3 in ccv3, V2 in chara)")
        return 0
    card = export_project(parsed) if target == "project" else export_card(parsed, target)
    text = json.dumps(card, ensure_ascii=False, indent=2) + "\n"
    if args.out is None:
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:  # `| head`: the reader has had enough
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        return 0
    try:
        await asyncio.to_thread(Path(args.out).write_text, text, encoding="utf-8")
    except OSError as exc:
        raise Failed(f"cannot write {args.out}: {_os_reason(exc)}") from None
    print(f"{persona.id}: written to {args.out} ({_format_name(target)})")
    return 0


def _format_name(target: str) -> str:
    return "this project's card file" if target == "project" else f"a {target.upper()} card"


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return _one_line(exc)


async def _import(
    conn: asyncpg.Connection, args: argparse.Namespace, cards: list[tuple[str, ParsedCard]]
) -> int:
    from server.personas_admin import import_cards

    result = await import_cards(
        conn,
        cards,
        chosen_id=args.id,
        replace_existing=args.replace,
        dry_run=args.dry_run,
        timeout_s=args.timeout,
    )
    lines = []
    for item in result.imported:
        for note in item.notes:
            print(f"{item.source}: note: {note}")
        card = f"{item.source} ({item.spec.upper()} card)"
        verb = "imported" if item.action == "create" else "replaced by"
        if result.dry_run:
            verb = "would be " + verb
            lines.append(f"{item.id}: {verb} {card}, as version {item.version}")
        else:
            lines.append(f"{item.id}: {verb} {card}, saved as version {item.version}")
    if result.dry_run:
        for line in lines:
            print(line)
        print("dry run: nothing was written")
        return 0
    return _report(lines, result.outcome, args.timeout)


async def _enable(conn: asyncpg.Connection, args: argparse.Namespace, _cards: object) -> int:
    return await _set_enabled(conn, args, True)


async def _disable(conn: asyncpg.Connection, args: argparse.Namespace, _cards: object) -> int:
    return await _set_enabled(conn, args, False)


async def _set_enabled(conn: asyncpg.Connection, args: argparse.Namespace, enabled: bool) -> int:
    from server.personas_admin import set_enabled

    result = await set_enabled(conn, args.id, enabled, args.timeout)
    state = "enabled" if enabled else "disabled"
    if not result.changed:
        print(f"{result.id}: already {state} (version {result.version}): nothing to do")
        return 0
    return _report([f"{result.id}: {state}, saved as version {result.version}"], result.outcome,
                   args.timeout)  # fmt: skip


async def _remove(conn: asyncpg.Connection, args: argparse.Namespace, _cards: object) -> int:
    from server.personas_admin import remove

    result = await remove(conn, args.id, args.reassign, args.timeout)
    line = f"{result.id}: removed"
    if result.reassigned_to is not None:
        line += f", {_count(len(result.users), 'avatar')} moved to {result.reassigned_to}"
    return _report([line], result.outcome, args.timeout)


def _report(lines: list[str], outcome: Outcome, timeout_s: float) -> int:
    """Print what was saved and who confirmed it; 1 when a server process did not."""
    n = len(outcome.confirmed)
    said = f"confirmed by {n} server {'process' if n == 1 else 'processes'}"
    if not outcome.confirmed and not outcome.missing:
        said += " (none is running)"
    if len(lines) == 1:
        print(f"{lines[0]}; {said}")
    else:
        print("\n".join([*lines, said]))
    if outcome.missing:
        k = len(outcome.missing)
        who = "server process" if k == 1 else "server processes"
        _error(
            f"the edit is committed, but {k} {who} did not confirm it within {timeout_s:g} s: "
            + ", ".join(outcome.missing)
        )
        return 1
    return 0


ACTIONS: dict[str, Callable[..., Any]] = {
    "list": _list,
    "show": _show,
    "export": _export,
    "import": _import,
    "enable": _enable,
    "disable": _disable,
    "remove": _remove,
}
