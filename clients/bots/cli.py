"""`run.py bots`: load-test bots that check persona correctness, with live progress and a report."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import re
import sys
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from rich.console import Console
from rich.live import Live

from clients.bots.load import MAX_CHATS_PER_S_PER_BOT, LoadConfig, TokenSource, run_load
from clients.bots.plan import BotPlan, Mode
from clients.bots.report import LiveView, Stats, render_report, write_json
from clients.connection import connect_failure
from clients.link import CONNECT_ERRORS, OPEN_TIMEOUT_S, Link
from clients.loop import run_async

MAX_CLIENTS = 50_000
DEFAULT_URL = "ws://127.0.0.1:8765/ws"
LIVE_PERIOD_S = 1.0
RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")

__all__ = ["LoadConfig", "Mode", "main", "plan_from", "run_load"]


class UsageError(Exception):
    """Bad options: reported on stderr with exit status 2."""


def plan_from(
    url: str, duration_s: float, switch_every: int, think_ms: float, http_switch_ratio: float = 0.0
) -> BotPlan:
    """The bots' plan, bounded in count as well as in time."""
    return BotPlan(
        url=url,
        switch_every=switch_every,
        think_s=think_ms / 1000.0,
        max_chats=math.ceil(duration_s * MAX_CHATS_PER_S_PER_BOT) + 1,
        http_switch_ratio=http_switch_ratio,
    )


def config_from(args: argparse.Namespace, token_for: TokenSource | None) -> LoadConfig:
    if not 1 <= args.clients <= MAX_CLIENTS:
        raise UsageError(f"--clients must be 1 to {MAX_CLIENTS}")
    if not 0 < args.duration <= 24 * 3600 or args.ramp < 0 or args.think < 0:
        raise UsageError("--duration must be positive; --ramp and --think not negative")
    if args.switch_every < 0 or (args.users is not None and args.users < 1):
        raise UsageError("--switch-every must be >= 0 and --users >= 1")
    urls = tuple(args.url or (DEFAULT_URL,))
    api_urls = tuple(args.api_url or ())
    if len(api_urls) > len(urls):
        raise UsageError("more --api-url than --url: each --api-url pairs with a --url in order")
    if not 0.0 <= args.http_switch_ratio <= 1.0:
        raise UsageError("--http-switch-ratio must be 0 to 1")
    if args.connect_per_source < 1:
        raise UsageError("--connect-per-source must be >= 1")
    run_id = args.run_id
    if run_id is not None and not RUN_ID.fullmatch(run_id):
        raise UsageError("--run-id: 1 to 32 letters, digits, '-' or '_'")
    plan = plan_from(urls[0], args.duration, args.switch_every, args.think, args.http_switch_ratio)
    return LoadConfig(
        plan=plan,
        clients=args.clients,
        duration_s=args.duration,
        ramp_s=args.ramp,
        users=args.users,
        token_for=token_for,
        urls=urls,
        api_urls=api_urls,
        per_source=args.connect_per_source,
        shared_run=run_id is not None,
        **({"run_id": run_id} if run_id is not None else {}),
    )


@contextlib.asynccontextmanager
async def live_progress(stats: Stats, clients: int, quiet: bool) -> AsyncIterator[None]:
    """Redraw the progress table on stderr about once a second (nothing when quiet)."""
    if quiet:
        yield
        return
    view = LiveView(stats, clients)
    with Live(view.table(), console=Console(stderr=True), auto_refresh=False) as live:

        async def tick() -> None:
            while True:
                await asyncio.sleep(LIVE_PERIOD_S)
                live.update(view.table(), refresh=True)

        ticker = asyncio.create_task(tick())
        try:
            yield
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker


async def unreachable(url: str) -> str | None:
    """Why nothing can connect to `url` (None when one connection opens): a run with no server
    is a mistake to say in one line, not a report of zeros."""
    try:
        link = await Link.open(url)
    except CONNECT_ERRORS as exc:
        return f"cannot connect to {url}: {connect_failure(url, exc)}"
    await link.close()
    return None


async def api_unreachable(api_url: str) -> str | None:
    """Why nothing can connect to the HTTP API at `api_url` (None when a connection opens)."""
    parts = urlsplit(api_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        async with asyncio.timeout(OPEN_TIMEOUT_S):
            _, writer = await asyncio.open_connection(parts.hostname, port)
    except (OSError, TimeoutError) as exc:
        return f"cannot connect to the HTTP API at {api_url} ({exc}); pass --api-url"
    writer.close()
    return None


async def run_with_progress(config: LoadConfig, quiet: bool) -> dict[str, Any]:
    stats = Stats()
    async with live_progress(stats, config.clients, quiet):
        return await run_load(config, stats)


def main(args: argparse.Namespace, token_for: TokenSource | None) -> int:
    """Run the bots, print the report; exit 1 on a stale render or unexpected error, 2 on misuse
    or when no connection can be opened.

        `token_for` signs a token for each bot's user; the command line (run.py) makes it from the
        server's secret, or passes None when it has none.
    """
    try:
        config = config_from(args, token_for)
        for target in config.targets():
            why = run_async(unreachable(target.url))
            if why is None and config.plan.http_switch_ratio > 0:
                why = run_async(api_unreachable(target.api_url))
            if why is not None:
                raise UsageError(why)
        if token_for is None:
            raise UsageError("no JWT secret: pass --secret, or --data-dir where jwt_secret lives")
    except UsageError as exc:
        print(f"bots: {exc}", file=sys.stderr)
        return 2
    report = run_async(run_with_progress(config, bool(getattr(args, "quiet", False))))
    Console().print(render_report(report))
    if args.json:
        write_json(report, args.json)
    return 0 if report["ok"] else 1
