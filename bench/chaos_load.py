"""The chaos run's load: bots over several instances that reconnect after a fault, with a ledger
of what the servers acknowledged and the time each bot took to get a reply after each fault."""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from clients.bots.bot import UNKNOWN_OUTCOME, Bot, Crew
from clients.bots.plan import BotPlan, Pending, Phase
from clients.bots.report import Stats

RECONNECT_S = 0.25  # a bot whose connection failed tries again after this
RAMP_TIMEOUT_S = 120.0
CHUNK = 10_000  # acknowledged replies looked up per statement


@dataclass(frozen=True, slots=True)
class AckedReply:
    user: str
    message_id: int
    reply_id: int
    persona: str
    status: str


@dataclass(slots=True)
class SwitchRecord:
    """One switch a bot sent, and how it was answered: "acked", "rejected" (not applied), or
    "unknown" (unavailable, internal, or no answer before its connection went: it may have
    committed)."""

    user: str
    persona: str
    sent_at: float
    answered_at: float = math.inf
    outcome: str = "unknown"


@dataclass
class Ledger:
    """Every reply and switch the servers acknowledged, for the check against the database."""

    replies: list[AckedReply] = field(default_factory=list)
    switches: list[SwitchRecord] = field(default_factory=list)

    def allowed_personas(self) -> dict[str, set[str]]:
        """Per user with an acknowledged switch: the personalities the database may hold now.
        That of the switch acknowledged last (L), or of one that may have committed after it:
        one not answered before L was sent, unless it was refused."""
        by_user: dict[str, list[SwitchRecord]] = {}
        for switch in self.switches:
            by_user.setdefault(switch.user, []).append(switch)
        allowed: dict[str, set[str]] = {}
        for user, switches in by_user.items():
            acked = [s for s in switches if s.outcome == "acked"]
            if not acked:
                continue
            last = max(acked, key=lambda s: s.answered_at)
            later = {
                s.persona
                for s in switches
                if s is not last and s.outcome != "rejected" and s.answered_at > last.sent_at
            }
            allowed[user] = {last.persona} | later
        return allowed


class Recovery:
    """When each fault struck, and per bot slot the first completed reply after it."""

    def __init__(self, slots: int) -> None:
        self._slots = slots
        self.faults: list[tuple[str, float]] = []  # (what, when: time.perf_counter())
        self._waiting: list[set[int]] = []  # per fault: the slots without a reply since
        self._seconds: list[list[float]] = []  # per fault: each slot's time to its first reply

    def fault(self, what: str) -> None:
        self.faults.append((what, time.perf_counter()))
        self._waiting.append(set(range(self._slots)))
        self._seconds.append([])

    def replied(self, slot: int, now: float) -> None:
        for index, waiting in enumerate(self._waiting):
            if slot in waiting:
                waiting.discard(slot)
                self._seconds[index].append(now - self.faults[index][1])

    def summary(self) -> list[dict[str, Any]]:
        """Per fault: the recovery time over the bots (p50, max) and the bots with no reply."""
        rows = []
        for (what, _), seconds, waiting in zip(
            self.faults, self._seconds, self._waiting, strict=True
        ):
            rows.append(
                {
                    "fault": what,
                    "bots_replied": len(seconds),
                    "bots_without_reply": len(waiting),
                    "p50_s": round(statistics.median(seconds), 3) if seconds else None,
                    "max_s": round(max(seconds), 3) if seconds else None,
                }
            )
        return rows


class ChaosBot(Bot):
    """A bot that writes what it was acknowledged into the ledger, and its replies' times into
    the recovery; one per connection (a reconnect makes a new one)."""

    def __init__(
        self,
        slot: int,
        index: int,
        user: str,
        token: str,
        plan: BotPlan,
        stats: Stats,
        phase: Phase,
        ledger: Ledger,
        recovery: Recovery,
        crew: Crew | None = None,
    ) -> None:
        super().__init__(index, user, token, plan, stats, phase, True, crew=crew)
        self.slot = slot
        self._ledger = ledger
        self._recovery = recovery

    def _check(self, pending: Pending, frame: dict[str, Any], now: float) -> None:
        if pending.kind == "switch":
            record = self._switch_record(pending)
            record.answered_at = now
            if frame.get("type") == "persona_set":
                record.outcome = "acked"
            elif frame.get("type") == "error" and frame.get("code") not in UNKNOWN_OUTCOME:
                record.outcome = "rejected"
        super()._check(pending, frame, now)

    def _check_reply(self, pending: Pending, frame: dict[str, Any], now: float) -> None:
        super()._check_reply(pending, frame, now)
        status = str(frame.get("status"))
        self._ledger.replies.append(
            AckedReply(
                self.user,
                int(frame["message_id"]),
                int(frame["reply_id"]),
                str(frame.get("persona")),
                status,
            )
        )
        if status == "completed":
            self._recovery.replied(self.slot, now)

    def _switch_record(self, pending: Pending) -> SwitchRecord:
        """A switch into the ledger: once, when it is answered or its connection went."""
        record = SwitchRecord(self.user, pending.expect, pending.sent_at)
        self._ledger.switches.append(record)
        return record

    def unanswered_switches(self) -> None:
        """The switches still pending when the connection went: their outcome is unknown."""
        for pending in self._pending.values():
            if pending.kind == "switch":
                self._switch_record(pending)


@dataclass(frozen=True, slots=True)
class Fleet:
    """Bots in slots: slot s speaks to instance s mod N as user (s div N) mod users, so that
    every user has a connection on each instance."""

    plans: Sequence[BotPlan]  # one per instance
    slots: int
    users: int
    run_id: str
    token_for: Callable[[str], str]
    crew: Crew | None = None  # shared by the bots: the propagation of switches across instances

    def user(self, slot: int) -> str:
        return f"chaos-{self.run_id}-{(slot // len(self.plans)) % self.users}"


async def start_fleet(
    fleet: Fleet, stats: Stats, phase: Phase, ledger: Ledger, recovery: Recovery
) -> list[asyncio.Task[None]]:
    """Start every slot and wait (bounded) until each has connected once; the slots chat once
    the caller starts `phase`, until it ends, reconnecting after each failure."""
    arrived = [asyncio.Event() for _ in range(fleet.slots)]
    tasks = [
        asyncio.create_task(_slot(fleet, slot, stats, phase, ledger, recovery, arrived[slot]))
        for slot in range(fleet.slots)
    ]
    try:
        async with asyncio.timeout(RAMP_TIMEOUT_S):
            await asyncio.gather(*(event.wait() for event in arrived))
    except TimeoutError:
        stats.error("ramp_timeout")
    return tasks


async def _slot(
    fleet: Fleet,
    slot: int,
    stats: Stats,
    phase: Phase,
    ledger: Ledger,
    recovery: Recovery,
    arrived: asyncio.Event,
) -> None:
    plan = fleet.plans[slot % len(fleet.plans)]
    user = fleet.user(slot)
    token = fleet.token_for(user)
    for generation in range(1_000_000):
        if phase.go.is_set() and not phase.running():
            break
        index = generation * fleet.slots + slot  # chat ids stay unique per user
        bot = ChaosBot(slot, index, user, token, plan, stats, phase, ledger, recovery, fleet.crew)
        try:
            if _opened(await bot.connect()) and await bot.prepare():
                arrived.set()
                await bot.work()
        except Exception as exc:  # a bug in the bot: counted (unexplained), and the slot goes on
            stats.error(f"bot_crashed_{type(exc).__name__}")
        finally:
            bot.unanswered_switches()
            await bot.close()
        if not arrived.is_set() and generation > 40:
            arrived.set()  # it tried for long enough: the run starts without it
        await asyncio.sleep(RECONNECT_S)


def _opened(result: object) -> bool:
    """Whether Bot.connect() opened the connection (a bool, or an Opened enum)."""
    return result is True or getattr(result, "value", None) == "open"


async def missing_writes(dsn: str, ledger: Ledger) -> dict[str, Any]:
    """Every acknowledged reply (its chat and its reply, with the persona and status it was
    acknowledged with) and every user's personality checked against the database."""
    conn = await asyncpg.connect(dsn, timeout=30)
    lost_replies: list[dict[str, Any]] = []
    wrong_personas: list[dict[str, Any]] = []
    try:
        replies = ledger.replies
        for start in range(0, len(replies), CHUNK):
            chunk = replies[start : start + CHUNK]
            ids = [r.message_id for r in chunk] + [r.reply_id for r in chunk]
            rows = await conn.fetch(
                "SELECT id, user_id, role, persona, status, reply_to FROM messages"
                " WHERE id = ANY($1::bigint[])",
                ids,
            )
            found = {row["id"]: row for row in rows}
            for acked in chunk:
                chat, reply = found.get(acked.message_id), found.get(acked.reply_id)
                if not (
                    chat is not None
                    and reply is not None
                    and chat["user_id"] == acked.user == reply["user_id"]
                    and chat["role"] == "user"
                    and reply["role"] == "assistant"
                    and reply["reply_to"] == acked.message_id
                    and reply["persona"] == acked.persona
                    and reply["status"] == acked.status
                ):
                    lost_replies.append(
                        {"user": acked.user, "message_id": acked.message_id,
                         "reply_id": acked.reply_id, "persona": acked.persona}
                    )  # fmt: skip
        allowed = ledger.allowed_personas()
        rows = await conn.fetch(
            "SELECT user_id, personality FROM avatars WHERE user_id = ANY($1::text[])",
            list(allowed),
        )
        stored = {row["user_id"]: row["personality"] for row in rows}
        for user, personas in allowed.items():
            if stored.get(user) not in personas:
                wrong_personas.append(
                    {"user": user, "stored": stored.get(user), "allowed": sorted(personas)}
                )
    finally:
        await conn.close()
    return {
        "replies_checked": len(ledger.replies),
        "switches_acked": sum(s.outcome == "acked" for s in ledger.switches),
        "users_checked": len(allowed),
        "lost_replies": len(lost_replies),
        "lost_reply_examples": lost_replies[:10],
        "lost_switches": len(wrong_personas),
        "lost_switch_examples": wrong_personas[:10],
    }
