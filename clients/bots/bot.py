"""One load-test bot: a real WebSocket client that chats, switches persona, checks every answer."""

from __future__ import annotations

import asyncio
import enum
import math
import time
from dataclasses import dataclass
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from clients.bots.api import Api
from clients.bots.http_switch import HttpSwitcher
from clients.bots.net import RETRY_STATUSES, Target
from clients.bots.plan import BotPlan, Mode, Pacer, Pending, Phase
from clients.bots.propagation import Propagation
from clients.bots.reading import MAX_FRAMES_PER_ANSWER, BotFailed, Reading
from clients.bots.report import Stats
from clients.link import Link

INVALID_PERSONA = "no-such-persona"
PUSH_GRACE_S = 0.5  # how long a reply may precede the push of the switch it was rendered after
CLIENT_PACE = 0.8  # bots send at most this share of the rate the server announces
PACE_BURST = 4.0


class Opened(enum.Enum):
    """How a handshake went: open, failed (counted), or refused for now (429, 503: try again)."""

    OPEN = "open"
    FAILED = "failed"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Crew:
    """What the bots of a run share besides the plan: the HTTP client for switches made
    through the API, and the propagation of switches to the users' other connections."""

    api: Api | None = None
    propagation: Propagation | None = None
    tag: str = ""  # in every frame id: a chat's id is its idempotency key, unique per user,
    # and runs that share users (one --run-id) must not reuse each other's ids


class Bot(Reading):
    """One connection: handshake, then a bounded closed loop of chats until the deadline."""

    def __init__(
        self,
        index: int,
        user: str,
        token: str,
        plan: BotPlan,
        stats: Stats,
        phase: Phase,
        shared: bool = False,
        *,
        target: Target | None = None,
        source: str | None = None,
        crew: Crew | None = None,
    ) -> None:
        self.index = index
        self.user = user
        self.url = target.url if target is not None else plan.url
        self.api_url = target.api_url if target is not None else ""
        self.source = source  # the local address to connect from (None: the system's choice)
        self.refused: tuple[int, str | None] = (0, None)  # the last refusal: status, Retry-After
        self._crew = crew or Crew()
        self._shared = shared  # other connections of this run use the same user
        self._token = token
        self._plan = plan
        self._stats = stats
        self._phase = phase
        self._link: Link | None = None
        self._pending: dict[str, Pending] = {}
        self._current: set[str] = set()  # personas that may be the avatar's right now
        self._personas: tuple[str, ...] = ()  # the enabled catalogue, as welcome listed it
        self._seq = 0
        self._switches = 0
        self._suspects: list[tuple[float, dict[str, Any]]] = []  # (grace deadline, stale example)
        self._closing = False
        self._pacer: Pacer | None = None
        self._http: HttpSwitcher | None = None  # switches through the HTTP API
        if self._crew.api is not None and plan.http_switch_ratio > 0 and self.api_url:
            link = self._crew.api.link(self.api_url, token, source)
            ratio, propagation = plan.http_switch_ratio, self._crew.propagation
            self._http = HttpSwitcher(index, user, ratio, link, stats, propagation, self._expect)
        self._joined = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def stats(self) -> Stats:
        return self._stats

    @property
    def open_timeout_s(self) -> float:
        return self._plan.open_timeout_s

    async def connect(self, last_try: bool = True) -> Opened:
        """Open the connection. A refusal for now (429, 503) is REFUSED, with `refused` saying
        how, and counted as an error only on the last try; any other failure is counted."""
        options: dict[str, Any] = {}
        if self.source is not None:
            options["local_addr"] = (self.source, 0)
        try:
            self._link = await Link.open(
                self.url,
                proxy=None,
                open_timeout=self._plan.open_timeout_s,
                ping_interval=None,
                close_timeout=5,
                user_agent_header=None,
                **options,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in RETRY_STATUSES and not last_try:
                self.refused = (status, exc.response.headers.get("Retry-After"))
                return Opened.REFUSED
            self._stats.error(f"connect_http_{status}")
            return Opened.FAILED
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            self._stats.error(f"connect_{type(exc).__name__}")
            return Opened.FAILED
        self._stats.opened()
        return Opened.OPEN

    async def authenticate(self) -> bool:
        """Send `hello` and read `welcome`; False (counted) on failure."""
        try:
            if self._plan.mode is Mode.PROTOCOL:
                await self._hello()
            return True
        except (BotFailed, ConnectionClosed) as exc:
            self._count_failure(exc)
            return False

    async def ensure_avatar(self) -> bool:
        """Make sure the avatar exists (after `authenticate`); False (counted) on failure."""
        try:
            if self._plan.mode is Mode.PROTOCOL:
                await self._ensure_avatar()
            return True
        except (BotFailed, ConnectionClosed) as exc:
            self._count_failure(exc)
            return False

    async def prepare(self) -> bool:
        """Authenticate and make sure the avatar exists; False (counted) on failure."""
        return await self.authenticate() and await self.ensure_avatar()

    async def work(self) -> None:
        """After the go signal: chat (or hold) until the deadline, then drain and close."""
        try:
            if self._plan.chat:
                await self._chat_loop()
            else:
                await self._hold()
            await self._settle_http()
            await self._drain()
        except (BotFailed, ConnectionClosed) as exc:
            self._count_failure(exc)
        finally:
            self._settle_suspects(math.inf)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
        if self._joined and self._crew.propagation is not None:
            self._crew.propagation.leave(self.user, self.index)
        link = self._link
        if link is None:
            return
        self._closing = True
        try:
            await link.close()
        except (OSError, ConnectionClosed):
            pass
        finally:
            self._link = None
            self._stats.closed()

    def _count_failure(self, exc: BaseException) -> None:
        if isinstance(exc, ConnectionClosed) and not self._closing:
            code = exc.rcvd.code if exc.rcvd is not None else "none"
            self._stats.error(f"closed_{code}")

    # ------------------------------------------------------------------ phases

    async def _hello(self) -> None:
        welcome = await self._request({"type": "hello", "token": self._token}, "hello")
        if welcome.get("type") != "welcome":
            raise BotFailed("hello was not answered with welcome")  # counted by _check
        if self._crew.propagation is not None:
            self._crew.propagation.join(self.user, self.index)
            self._joined = True
        rate = float((welcome.get("limits") or {}).get("rate_per_s") or 0.0)
        if rate > 0:
            self._pacer = Pacer(rate * CLIENT_PACE, PACE_BURST)
        listed = welcome.get("personas") or ()
        self._personas = tuple(str(p["id"]) for p in listed if isinstance(p, dict) and "id" in p)
        if not self._personas:
            raise BotFailed("welcome listed no persona")  # counted by _check
        avatar = welcome.get("avatar")
        if avatar is not None:
            self._current = {str(avatar["personality"])}

    async def _ensure_avatar(self) -> None:
        if self._current:  # welcome had the avatar, or a push told of it meanwhile
            return
        first = self._personas[self.index % len(self._personas)]
        frame = {"type": "create_avatar", "name": f"Bot {self.index}", "personality": first}
        answer = await self._request(frame, "create")
        if answer.get("type") == "avatar":
            self._current.add(str(answer["avatar"]["personality"]))
        elif answer.get("code") == "avatar_exists":  # another bot of this user won the race:
            await self._switch(by_command=False)  # switch, so the persona is known
        else:
            raise BotFailed("create_avatar failed")  # counted by _check

    async def _chat_loop(self) -> None:
        plan = self._plan
        await self._phase.go.wait()
        chats = 0
        while self._phase.running() and chats < plan.max_chats:
            switching = plan.switch_every > 0 and chats > 0 and chats % plan.switch_every == 0
            by_http = False
            if switching:
                await self._settle_http()
                await self._maybe_invalid()
                by_http = self._http is not None and self._http.turn()
                if self._http is not None and by_http:
                    await self._http_switch(self._http)
                else:
                    await self._switch(by_command=self._switches % 2 == 1)
            ref = await self._send_chat(chats, after_switch=switching and not by_http)
            await self._await_answer(ref)
            chats += 1
            if plan.think_s > 0:
                await self._pause(plan.think_s)

    async def _hold(self) -> None:
        await self._phase.go.wait()
        remaining = self._phase.deadline - time.perf_counter()
        if remaining > 0:
            await asyncio.sleep(remaining)
        ref = await self._send({"type": "ping"}, Pending("ping", time.perf_counter()))
        await self._await_answer(ref)

    async def _drain(self) -> None:
        """Wait (bounded) for what is still unanswered: switch acks and invalid_persona errors."""
        deadline = time.perf_counter() + self._plan.answer_timeout_s
        for _ in range(MAX_FRAMES_PER_ANSWER):
            if not self._pending:
                break
            self._on_frame(await self._recv(deadline))
        else:
            raise self._fail("too_many_frames")
        if self._suspects:  # give late pushes their grace
            await self._pause(max(t for t, _ in self._suspects) - time.perf_counter())

    # ------------------------------------------------------------------ sending

    def _next_ref(self, kind: str) -> str:
        self._seq += 1
        return f"{kind[0]}{self._crew.tag}{self.index}-{self._seq}"

    async def _send(self, frame: dict[str, Any], pending: Pending) -> str:
        link = self._link
        assert link is not None, "connect() first"
        if self._pacer is not None:
            await self._pause(self._pacer.take())
        if pending.kind == "chat":  # what is current now, after any pause
            pending.accept = set(self._current)
        ref = self._next_ref(pending.kind)
        self._pending[ref] = pending
        pending.sent_at = time.perf_counter()
        await link.send({"id": ref, **frame})
        return ref

    async def _request(self, frame: dict[str, Any], kind: str) -> dict[str, Any]:
        """Send and wait for the answer; returns the answer frame."""
        ref = await self._send(frame, Pending(kind, 0.0))
        return await self._await_answer(ref)

    async def _send_chat(self, n: int, after_switch: bool = False) -> str:
        self._stats.chats_sent += 1
        text = f"bot {self.index} says hello, message {n}"
        pending = Pending("chat", 0.0, after_switch=after_switch)
        return await self._send({"type": "chat", "text": text}, pending)

    async def _switch(self, by_command: bool) -> None:
        """Switch to a persona the avatar surely does not have; never wait for the ack here."""
        self._switches += 1
        target = self._pick_target()
        pending = Pending("switch", 0.0, target, before=set(self._current))
        await self._send(self._switch_frame(target, by_command), pending)
        self._stats.switches += 1
        self._current = {target}

    def _pick_target(self) -> str:
        """A persona the avatar surely does not have (any, if every one may be current)."""
        personas, start = self._personas, self.index + self._switches
        for step in range(len(personas)):
            target = personas[(start + step) % len(personas)]
            if target not in self._current:
                return target
        return personas[start % len(personas)]

    # ------------------------------------------------------------------ switching over HTTP

    def _expect(self, personas: set[str]) -> None:
        """What a switch through the API leaves the avatar as, as far as the bot can tell."""
        self._current = personas

    async def _http_switch(self, http: HttpSwitcher) -> None:
        """Switch through `PATCH /avatars/me/persona`; never wait for its answer here. The
        bot's socket switches are answered first: one still in flight might commit after it."""
        no_switch = lambda: all(p.kind != "switch" for p in self._pending.values())  # noqa: E731
        if not await self._read_until(no_switch):
            raise self._fail("timeout")
        self._switches += 1
        self._current = http.start(self._pick_target(), self._current)

    async def _settle_http(self) -> None:
        """Wait (reading frames) until the switch through the API, if any, has settled."""
        http = self._http
        if http is not None:
            await self._read_until(http.settled)
            http.give_up()

    async def _maybe_invalid(self) -> None:
        every = self._plan.invalid_every
        if every <= 0 or (self._switches + 1) % every:
            return
        by_command = (self._switches // every) % 2 == 0
        await self._send(self._switch_frame(INVALID_PERSONA, by_command), Pending("invalid", 0.0))
        self._stats.invalid_sent += 1

    @staticmethod
    def _switch_frame(personality: str, by_command: bool) -> dict[str, Any]:
        if by_command:
            return {"type": "chat", "text": f"/persona {personality}"}
        return {"type": "set_persona", "personality": personality}

    # ------------------------------------------------------------------ receiving

    def _on_frame(self, frame: dict[str, Any]) -> str | None:
        """Check one frame; return the ref it answered (None for pushes and deltas)."""
        self._settle_suspects(time.perf_counter())
        kind = frame.get("type")
        if kind == "persona_changed":
            self._on_persona_changed(str(frame.get("personality")), str(frame.get("previous")))
            return None
        ref = frame.get("id") if self._plan.mode is Mode.ECHO else frame.get("ref")
        if kind == "reply_delta":
            if ref not in self._pending:
                self._stats.error("unexpected_ref")
            return None
        pending = self._pending.pop(ref, None) if isinstance(ref, str) else None
        if pending is None:
            self._stats.error(f"unexpected_ref_{kind}")
            return None
        self._check(pending, frame, time.perf_counter())
        return str(ref)

    def _check(self, pending: Pending, frame: dict[str, Any], now: float) -> None:
        kind = frame.get("type")
        if self._plan.mode is Mode.ECHO:  # the echo of our own frame answers it
            self._check_echo(pending, now)
            return
        if kind == "error":
            self._check_error(pending, str(frame.get("code")))
        elif pending.kind == "chat" and kind == "reply":
            self._check_reply(pending, frame, now)
        elif pending.kind == "switch" and kind == "persona_set":
            if frame.get("personality") != pending.expect:
                self._stats.error("wrong_persona_set")
            elif self._crew.propagation is not None:
                previous = str(frame.get("previous"))
                propagation = self._crew.propagation
                propagation.switched(self.user, self.index, pending.expect, previous, now)
            self._stats.switch_ack(now - pending.sent_at)
        elif (pending.kind, kind) in _EXPECTED_ANSWERS:
            self._stats.pongs += kind == "pong"
        else:
            self._stats.error(f"unexpected_answer_{pending.kind}_{kind}")

    def _check_error(self, pending: Pending, code: str) -> None:
        if pending.kind == "invalid" and code == "invalid_persona":
            self._stats.invalid_rejected += 1
        elif pending.kind == "create" and code == "avatar_exists":
            pass
        else:
            if pending.kind == "switch":
                self._switch_failed(pending, code)
            if code == "overloaded":  # the server shed load, as it should: not a fault
                self._stats.overloaded += 1
            else:
                self._stats.error(code)

    def _switch_failed(self, switch: Pending, code: str) -> None:
        """A switch answered with an error: not applied, or (`unavailable`, `overloaded`,
        `internal`: the database went away or timed out around its commit) not known to be.

        Until the bot's next switch, the personas before it count again, also for the chats
        sent behind it (the server may read such a chat only once the switch has failed, and
        then renders it with the avatar as it is), unless another connection's change was pushed
        meanwhile: that change is newer than they are, and the push already counts.
        """
        if code not in UNKNOWN_OUTCOME:
            self._current.discard(switch.expect)
        if switch.pushed:
            return
        self._current |= switch.before
        for waiting in self._pending.values():
            if waiting.kind == "chat" and waiting.sent_at >= switch.sent_at:
                waiting.accept |= switch.before

    def _check_echo(self, pending: Pending, now: float) -> None:
        if pending.kind == "chat":
            self._stats.reply(now - pending.sent_at, now < self._phase.deadline)
        else:
            self._stats.pongs += pending.kind == "ping"

    def _check_reply(self, pending: Pending, frame: dict[str, Any], now: float) -> None:
        self._stats.reply(now - pending.sent_at, now < self._phase.deadline, pending.after_switch)
        if frame.get("status") != "completed":
            self._stats.error(f"reply_{frame.get('status')}")
        if frame.get("replayed"):
            self._stats.error("replayed")
        persona = frame.get("persona")
        if persona in pending.accept:
            return
        example = {
            "bot": self.index,
            "user": self.user,
            "ref": frame.get("ref"),
            "persona": persona,
            "expected": sorted(pending.accept),
        }
        if self._shared:  # a push for a commit just before this render may still be on its way
            self._suspects.append((now + PUSH_GRACE_S, example))
        else:
            self._stats.stale_render(example)

    def _on_persona_changed(self, personality: str, previous: str) -> None:
        """Another connection of this user switched persona, or this bot through the API.

        Pushes can arrive out of commit order, so a push never replaces what the bot believes
        is current: it widens it, until the bot's own next switch. Chats in flight may render it.
        """
        self._stats.pushes += 1
        for pending in self._pending.values():
            if pending.kind == "chat":
                pending.accept.add(personality)
            elif pending.kind == "switch":
                pending.pushed = True
        self._current.add(personality)
        self._suspects = [(t, ex) for t, ex in self._suspects if ex["persona"] != personality]
        now = time.perf_counter()
        if self._http is not None:  # its own push settles a switch through the API
            self._http.on_push(personality, previous, now)
        elif self._crew.propagation is not None:
            self._crew.propagation.pushed(self.user, self.index, personality, previous, now)

    def _settle_suspects(self, now: float) -> None:
        """Count as stale the suspect replies whose grace ran out without a matching push."""
        if not self._suspects:
            return
        for _, example in (item for item in self._suspects if item[0] <= now):
            self._stats.stale_render(example)
        self._suspects = [item for item in self._suspects if item[0] > now]


# Errors after which a switch may have committed all the same.
UNKNOWN_OUTCOME = frozenset({"unavailable", "overloaded", "internal"})
_EXPECTED_ANSWERS = frozenset({("hello", "welcome"), ("create", "avatar"), ("ping", "pong")})
