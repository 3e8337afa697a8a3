"""`run.py bots`: load-test bots that check persona correctness, with live progress and a report."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
from collections.abc import AsyncIterator
from typing import Any

from rich.console import Console
from rich.live import Live

from clients.bots.load import MAX_CHATS_PER_S_PER_BOT, LoadConfig, TokenSource, run_load
from clients.bots.plan import BotPlan, Mode
from clients.bots.report import LiveView, Stats, render_report, write_json
from clients.connection import connect_failure
from clients.link import CONNECT_ERRORS, Link
from clients.loop import run_async

MAX_CLIENTS = 50_000
LIVE_PERIOD_S = 1.0

__all__ = ["LoadConfig", "Mode", "main", "plan_from", "run_load"]


class UsageError(Exception):
    """Bad options: reported on stderr with exit status 2."""


def plan_from(url: str, duration_s: float, switch_every: int, think_ms: float) -> BotPlan:
    """The bots' plan, bounded in count as well as in time."""
    return BotPlan(
        url=url,
        switch_every=switch_every,
        think_s=think_ms / 1000.0,
        max_chats=math.ceil(duration_s * MAX_CHATS_PER_S_PER_BOT) + 1,
    )


def config_from(args: argparse.Namespace, token_for: TokenSource | None) -> LoadConfig:
    if not 1 <= args.clients <= MAX_CLIENTS:
        raise UsageError(f"--clients must be 1 to {MAX_CLIENTS}")
    if not 0 < args.duration <= 24 * 3600 or args.ramp < 0 or args.think < 0:
        raise UsageError("--duration must be positive; --ramp and --think not negative")
    if args.switch_every < 0 or (args.users is not None and args.users < 1):
        raise UsageError("--switch-every must be >= 0 and --users >= 1")
    return LoadConfig(
        plan=plan_from(args.url, args.duration, args.switch_every, args.think),
        clients=args.clients,
        duration_s=args.duration,
        ramp_s=args.ramp,
        users=args.users,
        token_for=token_for,
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
        why = run_async(unreachable(config.plan.url))
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
