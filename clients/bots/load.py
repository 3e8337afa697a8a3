"""A run of many bots: bounded-concurrency ramp, a common start, and the report."""

from __future__ import annotations

import asyncio
import itertools
import logging
import resource
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from clients.bots.api import Api
from clients.bots.bot import Bot, Crew, Opened
from clients.bots.net import (
    PER_SOURCE,
    Gates,
    Target,
    is_loopback_url,
    loopback_sources,
    retry_delay_s,
    targets_of,
)
from clients.bots.plan import BotPlan, Mode, Phase
from clients.bots.propagation import Propagation
from clients.bots.report import Stats, build_report

log = logging.getLogger(__name__)

# A signed token for a user. The bots do not sign tokens themselves: whoever holds the secret
# does (run.py, the tests, the benchmark that configured the server), and passes this in.
TokenSource = Callable[[str], str]

FD_HEADROOM = 64
MAX_CHATS_PER_S_PER_BOT = 10_000  # bounds each bot's loop in count as well as in time


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """One run of many bots."""

    plan: BotPlan
    clients: int
    duration_s: float
    ramp_s: float = 0.0
    users: int | None = None  # distinct users; None: one per client
    token_for: TokenSource | None = None  # needed in PROTOCOL mode
    connect_concurrency: int = 200
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    urls: tuple[str, ...] = ()  # the instances (default: the plan's url), round-robin
    api_urls: tuple[str, ...] = ()  # their HTTP APIs, paired in order (default: port 8766)
    shared_run: bool = False  # another process may use this run's users (a --run-id given)
    per_source: int = PER_SOURCE  # handshakes in flight per source address and instance
    spread_sources: bool = True  # from 127.0.0.1 and up when the instances are on loopback

    def user_count(self) -> int:
        return max(1, min(self.users or self.clients, self.clients))

    def targets(self) -> tuple[Target, ...]:
        return targets_of(self.urls or (self.plan.url,), self.api_urls)

    def sources(self) -> tuple[str | None, ...]:
        """The local addresses the bots connect from, round-robin (None: the system's)."""
        if not self.spread_sources or not all(is_loopback_url(t.url) for t in self.targets()):
            return (None,)
        return loopback_sources(min(self.connect_concurrency, self.clients), self.per_source)

    def describe(self) -> dict[str, Any]:
        plan = self.plan
        targets = self.targets()
        return {
            "url": plan.url,
            "urls": [t.url for t in targets],
            "api_urls": [t.api_url for t in targets] if plan.http_switch_ratio > 0 else [],
            "run_id": self.run_id,
            "http_switch_ratio": plan.http_switch_ratio,
            "source_addresses": len(self.sources()),
            "mode": plan.mode.value,
            "clients": self.clients,
            "users": self.user_count(),
            "duration_s": self.duration_s,
            "ramp_s": self.ramp_s,
            "switch_every": plan.switch_every,
            "invalid_every": plan.invalid_every,
            "think_ms": plan.think_s * 1000.0,
            "chat": plan.chat,
        }


def raise_fd_limit(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard and (hard == resource.RLIM_INFINITY or soft < needed + FD_HEADROOM):
        target = hard if hard != resource.RLIM_INFINITY else max(needed + FD_HEADROOM, soft)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < needed + FD_HEADROOM:
        log.warning("only %d file descriptors for %d connections", soft, needed)
    return soft


def make_bots(
    config: LoadConfig, stats: Stats, phase: Phase, crew: Crew | None = None
) -> list[Bot]:
    """One bot per client, spread round-robin over the users of this run; the k-th connection
    of user u goes to instance (u + k) mod N, so that a shared user spans the instances."""
    plan = config.plan
    token_for = config.token_for if plan.mode is Mode.PROTOCOL else None
    if plan.mode is Mode.PROTOCOL and token_for is None:
        raise ValueError("the bots need a token for each user: pass token_for")
    users = [f"bot-{config.run_id}-{n}" for n in range(config.user_count())]
    tokens = [token_for(user) if token_for is not None else "" for user in users]
    count, targets, sources = len(users), config.targets(), config.sources()
    return [
        Bot(
            i,
            users[i % count],
            tokens[i % count],
            plan,
            stats,
            phase,
            config.shared_run or _is_shared(i, config),
            target=targets[(i % count + i // count) % len(targets)],
            source=sources[i % len(sources)],
            crew=crew,
        )
        for i in range(config.clients)
    ]


def _is_shared(index: int, config: LoadConfig) -> bool:
    """Whether another bot of the run uses the same user as bot `index` (users are round-robin)."""
    users = config.user_count()
    return index % users + users < config.clients


class _Arrivals:
    """Counts bots that finished (or failed) their handshake; fires when all have."""

    def __init__(self, total: int, stats: Stats) -> None:
        self._left = total
        self._stats = stats
        self.all = asyncio.Event()
        if total <= 0:
            self.all.set()

    def arrive(self, ready: bool) -> None:
        self._stats.ready += ready
        self._left -= 1
        if self._left <= 0:
            self.all.set()


@dataclass(frozen=True, slots=True)
class _Gates:
    """How many handshakes may be in flight: in all, and per source address and instance (the
    server refuses more than a few unauthenticated connections per client address)."""

    total: asyncio.Semaphore
    per_source: Gates


async def _open(bot: Bot, gates: _Gates, stats: Stats) -> bool:
    """Connect and authenticate within the gates; a handshake refused for now (429, 503) is
    tried again after a backoff, outside them, until the open timeout, and counted as a retry."""
    deadline = time.perf_counter() + bot.open_timeout_s
    for attempt in itertools.count():
        async with gates.per_source.of(bot.source, bot.url), gates.total:
            outcome = await bot.connect(last_try=time.perf_counter() >= deadline)
            if outcome is Opened.OPEN:
                return await bot.authenticate()
        if outcome is Opened.FAILED:
            return False
        delay = min(retry_delay_s(attempt, bot.refused[1]), deadline - time.perf_counter())
        stats.connect_retries += 1
        await asyncio.sleep(max(0.0, delay))
    raise AssertionError("unreachable")


async def _lifecycle(bot: Bot, delay_s: float, gates: _Gates, arrivals: _Arrivals) -> None:
    stats = bot.stats
    arrived = False
    try:
        await asyncio.sleep(delay_s)
        ready = await _open(bot, gates, stats) and await bot.ensure_avatar()
        arrivals.arrive(ready)
        arrived = True
        if ready:
            await bot.work()
    except Exception as exc:  # a bug in the bot must not hide the rest of the run
        log.exception("bot %d crashed", bot.index)
        stats.error(f"bot_crashed_{type(exc).__name__}")
    finally:
        if not arrived:
            arrivals.arrive(False)
        await bot.close()


async def run_load(
    config: LoadConfig,
    stats: Stats | None = None,
    on_ready: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """Run every bot: ramp up, await `on_ready`, chat for the duration; return the report."""
    stats = stats if stats is not None else Stats()
    plan = config.plan
    api = Api(plan.answer_timeout_s) if plan.http_switch_ratio > 0 else None
    return await _run(config, stats, on_ready, api)


async def _run(
    config: LoadConfig,
    stats: Stats,
    on_ready: Callable[[], Awaitable[None]] | None,
    api: Api | None,
) -> dict[str, Any]:
    raise_fd_limit(config.clients)
    phase = Phase()
    propagation = Propagation(stats)
    crew = Crew(api, propagation, secrets.token_hex(3))
    bots = make_bots(config, stats, phase, crew)
    arrivals = _Arrivals(len(bots), stats)
    gates = _Gates(asyncio.Semaphore(max(1, config.connect_concurrency)), Gates(config.per_source))
    step = config.ramp_s / max(1, len(bots))
    tasks = [
        asyncio.create_task(_lifecycle(bot, i * step, gates, arrivals))
        for i, bot in enumerate(bots)
    ]
    plan = config.plan
    ramp_bound = config.ramp_s + plan.open_timeout_s + 3 * plan.answer_timeout_s
    try:
        await asyncio.wait_for(arrivals.all.wait(), ramp_bound)
    except TimeoutError:
        stats.error("ramp_timeout")
    if on_ready is not None:
        await on_ready()
    phase.start(config.duration_s)
    await finish_bots(tasks, config.duration_s + 2 * plan.answer_timeout_s + 10.0, stats)
    propagation.finish()
    return build_report(stats, config.describe(), config.duration_s)


async def finish_bots(tasks: list[asyncio.Task[None]], bound_s: float, stats: Stats) -> None:
    """Wait for every bot, at most `bound_s`; cancel (and count) the ones still running."""
    if not tasks:
        return
    _, stuck = await asyncio.wait(tasks, timeout=bound_s)
    for task in stuck:
        task.cancel()
        stats.error("bot_stuck")
    if stuck:
        await asyncio.gather(*stuck, return_exceptions=True)
