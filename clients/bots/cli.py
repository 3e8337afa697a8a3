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

from clients.bots.load import MAX_CHATS_PER_S_PER_BOT, LoadConfig, run_load
from clients.bots.plan import BotPlan, Mode
from clients.bots.report import LiveView, Stats, render_report, write_json
from server.app import run_async
from server.settings import Settings

MAX_CLIENTS = 50_000
LIVE_PERIOD_S = 1.0

__all__ = ["LoadConfig", "Mode", "load_secret", "main", "plan_from", "run_load"]


class UsageError(Exception):
    """Bad options: reported on stderr with exit status 2."""


def load_secret(secret: str | None, data_dir: str | None) -> str:
    """--secret, else CHAT_JWT_SECRET, else the data directory's secret file (never created)."""
    if secret:
        return secret
    settings = Settings(data_dir=data_dir) if data_dir else Settings()
    if settings.jwt_secret is not None:
        return settings.jwt_secret.get_secret_value()
    path = settings.secret_path()
    if not path.is_file():
        raise UsageError(f"no JWT secret: pass --secret, or --data-dir where {path.name} lives")
    return path.read_text(encoding="utf-8").strip()


def plan_from(url: str, duration_s: float, switch_every: int, think_ms: float) -> BotPlan:
    """The bots' plan, bounded in count as well as in time."""
    return BotPlan(
        url=url,
        switch_every=switch_every,
        think_s=think_ms / 1000.0,
        max_chats=math.ceil(duration_s * MAX_CHATS_PER_S_PER_BOT) + 1,
    )


def config_from(args: argparse.Namespace) -> LoadConfig:
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
        secret=load_secret(args.secret, args.data_dir),
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


async def run_with_progress(config: LoadConfig, quiet: bool) -> dict[str, Any]:
    stats = Stats()
    async with live_progress(stats, config.clients, quiet):
        return await run_load(config, stats)


def main(args: argparse.Namespace) -> int:
    """Run the bots, print the report; exit 1 on a stale render or unexpected error, 2 on misuse."""
    try:
        config = config_from(args)
    except UsageError as exc:
        print(f"bots: {exc}", file=sys.stderr)
        return 2
    report = run_async(run_with_progress(config, bool(getattr(args, "quiet", False))))
    Console().print(render_report(report))
    if args.json:
        write_json(report, args.json)
    return 0 if report["ok"] else 1
