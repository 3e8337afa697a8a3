"""The lean load client: picows on uvloop, one listener per connection, no task per frame.

Every connection is a small state machine driven by picows' frame callback: it sends a chat,
and when the answer comes (the `reply`, and the `persona_set` of a switch sent right before the
chat) it sends the next one at once, until the deadline. Nothing is validated beyond what the
measurement needs: the answer's `ref`, and the `persona` of each reply (a stale render).
"""

from __future__ import annotations

import asyncio
import itertools
import resource
import secrets
import time
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

PERSONAS = ("friendly", "playful", "caring", "witty", "professional", "romantic")
TEXTS = (
    "hello there, how was your day?",
    "tell me something nice about the weather today",
    "I went for a long walk by the river this morning",
    "what should I cook tonight?",
    "do you remember what I said earlier?",
)
CONNECT_CONCURRENCY = 100
HANDSHAKE_TIMEOUT_S = 60.0
ANSWER_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 15.0


@dataclass(slots=True)
class Tally:
    """What every connection of one run adds to."""

    deadline: float = 0.0
    measure_from: float = 0.0  # deltas and their gaps are counted from then on
    latencies: array[float] = field(default_factory=lambda: array("d"))
    replies: int = 0  # all replies, the ones after the deadline too
    in_window: int = 0  # replies that arrived before the deadline
    switches: int = 0
    stale: int = 0
    deltas: int = 0
    gaps: array[float] = field(default_factory=lambda: array("d"))  # between deltas of a reply
    stamped: bool = False  # each delta starts with " t<perf_counter() when its token was sent>"
    delays: array[float] = field(default_factory=lambda: array("d"))  # received - sent
    errors: Counter[str] = field(default_factory=Counter)
    running: int = 0
    finished: asyncio.Event = field(default_factory=asyncio.Event)


class Conn(WSListener):
    """One connection; `request` for the handshake, then `start` for the closed loop."""

    def __init__(self, echo: bool) -> None:
        super().__init__()
        self.echo = echo
        self.transport: WSTransport | None = None
        self.waiter: asyncio.Future[dict[str, Any]] | None = None
        self.tally: Tally | None = None
        self.prefix = ""
        self.persona = PERSONAS[0]
        self.switch_every = 0
        self.seq = 0
        self.chat_id = ""
        self.switch_id = ""
        self.sent_at = 0.0
        self.last_delta = 0.0
        self.on_text: Callable[[bytes], None] = self._handshake_frame

    # ------------------------------------------------------------------ picows callbacks

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.TEXT:
            self.on_text(frame.get_payload_as_bytes())
        elif frame.msg_type is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("closed"))
        if self.tally is not None and (self.chat_id or self.switch_id):
            self.tally.errors["closed"] += 1
            self.chat_id = self.switch_id = ""
            self._done()

    # ------------------------------------------------------------------ the handshake

    def _handshake_frame(self, payload: bytes) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(orjson.loads(payload))

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send one frame and return the next frame that comes (the handshake is one at a time)."""
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.send(WSMsgType.TEXT, orjson.dumps(frame))
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            return await self.waiter

    async def authenticate(self, token: str, name: str) -> None:
        """hello, and an avatar when the user has none; the persona is then the avatar's."""
        welcome = await self.request({"type": "hello", "id": "h", "token": token})
        if welcome.get("type") != "welcome":
            raise RuntimeError(f"hello answered {welcome.get('type')} {welcome.get('code')}")
        avatar = welcome.get("avatar")
        if avatar is None:
            create = {"type": "create_avatar", "id": "a", "name": name, "personality": "friendly"}
            answer = await self.request(create)
            if answer.get("type") == "avatar":
                avatar = answer["avatar"]
            else:
                got = await self.request({"type": "get_avatar", "id": "g"})
                if got.get("type") != "avatar":
                    raise RuntimeError(f"create_avatar: {answer.get('code')}, get_avatar: "
                                       f"{got.get('code')}")  # fmt: skip
                avatar = got["avatar"]
        self.persona = avatar["personality"]

    # ------------------------------------------------------------------ the closed loop

    def start(self, tally: Tally, switch_every: int) -> None:
        self.tally = tally
        self.switch_every = 0 if self.echo else switch_every
        self.prefix = secrets.token_hex(4)
        self.on_text = self._echo_frame if self.echo else self._chat_frame
        tally.running += 1
        self._send_next()

    def _send_next(self) -> None:
        tally, transport = self.tally, self.transport
        assert tally is not None and transport is not None
        if time.perf_counter() >= tally.deadline or transport.is_disconnected:
            self._done()
            return
        self.seq += 1
        if self.switch_every and self.seq % self.switch_every == 0:
            self.persona = PERSONAS[(PERSONAS.index(self.persona) + 1) % len(PERSONAS)]
            self.switch_id = f"{self.prefix}s{self.seq}"
            switch = {"type": "set_persona", "id": self.switch_id, "personality": self.persona}
            transport.send(WSMsgType.TEXT, orjson.dumps(switch))
        self.chat_id = f"{self.prefix}c{self.seq}"
        chat = {"type": "chat", "id": self.chat_id, "text": TEXTS[self.seq % len(TEXTS)]}
        self.sent_at = self.last_delta = time.perf_counter()
        transport.send(WSMsgType.TEXT, orjson.dumps(chat))

    def _done(self) -> None:
        tally = self.tally
        if tally is None:
            return
        self.tally = None
        tally.running -= 1
        if tally.running <= 0:
            tally.finished.set()

    def _answered(self) -> None:
        tally = self.tally
        assert tally is not None
        now = time.perf_counter()
        tally.replies += 1
        tally.latencies.append(now - self.sent_at)
        if now <= tally.deadline:
            tally.in_window += 1

    def _echo_frame(self, payload: bytes) -> None:
        if self.tally is None or not self.chat_id:
            return
        self._answered()
        self.chat_id = ""
        self._send_next()

    def _chat_frame(self, payload: bytes) -> None:
        tally = self.tally
        if tally is None:
            return
        frame = orjson.loads(payload)
        kind = frame.get("type")
        if kind == "reply_delta":
            if frame.get("ref") == self.chat_id:
                now = time.perf_counter()
                if now >= tally.measure_from:
                    if self.last_delta != self.sent_at:
                        tally.gaps.append(now - self.last_delta)
                    tally.deltas += 1
                    if tally.stamped:
                        tally.delays.append(now - _stamp(frame.get("delta")))
                self.last_delta = now
            return
        if kind == "reply" and frame.get("ref") == self.chat_id:
            self._answered()
            if frame.get("persona") != self.persona:
                tally.stale += 1
            if frame.get("status") != "completed":
                tally.errors[f"reply {frame.get('status')}"] += 1
            self.chat_id = ""
        elif kind == "persona_set" and frame.get("ref") == self.switch_id:
            tally.switches += 1
            self.switch_id = ""
        elif kind == "error":
            tally.errors[str(frame.get("code"))] += 1
            ref = frame.get("ref")
            if ref == self.chat_id:
                self.chat_id = ""
            elif ref == self.switch_id:
                self.switch_id = ""
        elif kind != "persona_changed":
            tally.errors[f"unexpected {kind}"] += 1
        if not self.chat_id and not self.switch_id:
            self._send_next()


def _stamp(delta: Any) -> float:
    """The send time of the first token in a delta of the streaming benchmark's fake."""
    try:
        return float(str(delta).split(None, 1)[0][1:])
    except (ValueError, IndexError):
        return float("nan")


async def connect(
    url: str,
    count: int,
    echo: bool,
    token_for: Callable[[str], str] | None,
    users: Sequence[str],
    local_hosts: Sequence[str] = (),
    concurrency: int = CONNECT_CONCURRENCY,
    errors: Counter[str] | None = None,
) -> list[Conn]:
    """`count` connections, authenticated (hello, avatar) unless `echo`; each with the user of
    the same index; spread round-robin over `local_hosts` as source addresses when given.
    A failure raises, unless `errors` is given: then it is counted there, by kind."""
    gate = asyncio.Semaphore(concurrency)
    hosts = itertools.cycle(local_hosts) if local_hosts else None

    async def one(index: int) -> Conn:
        extra: dict[str, Any] = {}
        if hosts is not None:
            extra["local_addr"] = (next(hosts), 0)
        async with gate:
            _, conn = await ws_connect(
                lambda: Conn(echo),
                url,
                websocket_handshake_timeout=HANDSHAKE_TIMEOUT_S,
                enable_auto_pong=True,
                **extra,
            )
            assert isinstance(conn, Conn)
            if not echo and token_for is not None:
                user = users[index % len(users)]
                await conn.authenticate(token_for(user), f"bench {user}")
            return conn

    results = await asyncio.gather(*(one(index) for index in range(count)), return_exceptions=True)
    conns = [result for result in results if isinstance(result, Conn)]
    failures = [result for result in results if isinstance(result, BaseException)]
    if failures and errors is None:
        close_all(conns)
        raise failures[0]
    for failure in failures:
        assert errors is not None
        errors[f"{type(failure).__name__}: {str(failure)[:80]}"] += 1
    return conns


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def close_all(conns: Sequence[Conn]) -> None:
    for conn in conns:
        if conn.transport is not None and not conn.transport.is_disconnected:
            conn.transport.send_close()
            conn.transport.disconnect()


async def closed_loop(
    conns: Sequence[Conn],
    duration_s: float,
    switch_every: int,
    before: Callable[[], None] = lambda: None,
    after: Callable[[], None] = lambda: None,
    tally: Tally | None = None,
) -> tuple[Tally, float]:
    """Every connection chats until `duration_s` from now, then the answers in flight are
    waited for (at most DRAIN_TIMEOUT_S). `before` runs just before the first chat and `after`
    once the last answer is in (the CPU counters). Returns the tally and the elapsed time from
    the first chat to the last answer."""
    tally = tally or Tally()
    before()
    started = time.perf_counter()
    tally.deadline = started + duration_s
    for conn in conns:
        conn.start(tally, switch_every)
    try:
        async with asyncio.timeout(duration_s + DRAIN_TIMEOUT_S):
            await tally.finished.wait()
    except TimeoutError:
        tally.errors["drain timeout"] += tally.running
    elapsed = time.perf_counter() - started
    after()
    for conn in conns:
        conn.on_text = conn._handshake_frame
        conn.tally = None
    return tally, elapsed


def percentile_ms(values: Sequence[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return 1000.0 * ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
