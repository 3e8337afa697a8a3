"""The conversation: one connection's rules as a pure state machine. Inputs in, actions out.

Like websockets' sans-I/O `Protocol` (bytes in, events and bytes out) and h11's `Connection`
(an explicit state, frozen events), it does no I/O, awaits nothing and reads no clock: the
shell (server/session.py) feeds it the client's frames and the outcomes of the I/O it asked
for, passing the time, and carries out the actions it returns, in order.

Frames take effect in the order they were sent. A frame that needs I/O before it can be
answered (an avatar read, an avatar created, a history page, switches to be answered first)
holds up the frames behind it, which wait in a backlog; `wants_frames` tells the shell when to
stop reading. Chats are answered one at a time, in order, after the switch they were read
behind (and only if it committed).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from protocol import commands
from protocol.cards import greeting_for
from protocol.conversation.actions import (
    Action,
    Authenticate,
    CommitSwitch,
    LoadAvatar,
    Publish,
    ReadHistory,
)
from protocol.conversation.actions import CreateAvatar as CreateAvatarAction
from protocol.conversation.avatar import MAX_AVATAR_READS, AvatarView, PendingSwitch
from protocol.conversation.base import Meter, Phase, Terms, Wait
from protocol.conversation.chats import Claims, StoredIds
from protocol.conversation.limits import FrameLimit, UserBudgets, Verdict
from protocol.conversation.load import Load
from protocol.conversation.records import (
    Avatar,
    SwitchResult,
)
from protocol.conversation.replies import ChatRules
from protocol.errors import (
    BadJson,
    CloseCode,
    InvalidFrame,
    NoAvatar,
    Overloaded,
    ProtocolError,
    RateLimited,
    Unavailable,
    UnknownCommand,
)
from protocol.frames import Avatar as AvatarFrame
from protocol.frames import (
    Cancel,
    Chat,
    ChatFields,
    ClientFrameRead,
    CreateAvatar,
    GetAvatar,
    Hello,
    History,
    HistoryEntry,
    HistoryPage,
    Notice,
    PersonaChanged,
    Personas,
    PersonaSet,
    Ping,
    Pong,
    SetPersona,
    SetPersonaFields,
    Welcome,
    close_reason,
    decode_client_frame,
    decode_frame,
    encode,
    encode_listing,
    fit_history_page,
    frame_type,
    salvage_ref,
)

HISTORY_REQUEST_BYTES = 1024  # what a history request costs its user's budget besides its page


@dataclass(slots=True)
class _Read:
    """A read of the avatar on its way: the cache's epoch and the newest version seen when it
    started, and how many reads this frame took."""

    epoch: int
    known: int
    tries: int = 1


class Conversation(ChatRules):
    """One connection's conversation, from `hello` to close."""

    def __init__(
        self,
        terms: Terms,
        meter: Meter,
        claims: Claims,
        budgets: UserBudgets,
        now: float,
        trusted: bool = True,
        load: Load | None = None,
    ) -> None:
        """`claims`, `budgets` and `load` are the process's, shared by its conversations;
        without a `load`, chats are never shed."""
        super().__init__(terms.recent_messages)
        self.terms = terms
        self.phase = Phase.AWAITING_HELLO
        self.user_id = ""
        self._draining = False
        self._meter = meter
        self._claims = claims
        self._budgets = budgets
        self.load = load
        limits = terms.limits
        self._rate = FrameLimit(limits.rate_per_s, limits.rate_burst, terms.abuse_close_after, now)
        self._avatar = AvatarView(trusted)
        self._wait = Wait.NOTHING
        self._frame: tuple[ClientFrameRead, float] | None = None  # the frame held up, and when
        self._backlog: deque[tuple[str | bytes, float]] | None = None  # made on first use
        self._read: _Read | None = None
        self._fresh: Avatar | None = None  # read for the held-up frame, not cached
        self._keys = 0
        self._switches: dict[int, PendingSwitch] = {}

    # ------------------------------------------------------------------ what the shell reads

    @property
    def wants_frames(self) -> bool:
        """False while a frame is held up: the shell may stop reading until it is not."""
        return self.phase is not Phase.CLOSED and self._wait is Wait.NOTHING and not self._backlog

    # ------------------------------------------------------------------ inputs: the client

    def receive_text(self, raw: str | bytes, now: float) -> list[Action]:
        """A frame from the client, as it came (text, or bytes for a binary frame)."""
        if self.phase is Phase.CLOSED:
            return []
        if self._wait is not Wait.NOTHING or self._backlog:
            if self._backlog is None:
                self._backlog = deque()
            self._backlog.append((raw, now))
            return []
        self._handle(raw, now)
        return self._take()

    def connection_lost(self) -> list[Action]:
        """The connection is gone: waiting chats are dropped, the reply in flight is cancelled
        (it is still stored, as cancelled)."""
        self.phase = Phase.CLOSED
        self._backlog = None
        self._drop_chats()
        return self._take()

    # ------------------------------------------------------------------ inputs: the process

    def authenticated(
        self, user_id: str, avatar: Avatar | None, stored_ids: Iterable[str]
    ) -> list[Action]:
        """The `hello` was good: the user, its avatar and the ids of its newest chats."""
        self.user_id = user_id
        self._stored_ids = StoredIds(stored_ids)
        read = self._read
        self._read = None
        if read is not None and read.epoch != self._avatar.epoch:
            self._start_read()  # a change was notified while it loaded: read it again
        else:
            self._welcome(avatar, cache=True)
        return self._take()

    def refused(self, code: CloseCode, reason: str) -> list[Action]:
        """The `hello` was refused: close with this code."""
        self._close(code, reason)
        return self._take()

    def persona_notified(self, personality: str, previous: str, version: int) -> list[Action]:
        """Another connection of this user (here or in another process) changed the persona."""
        view = self._avatar
        view.notified(version)
        if view.welcomed and version > view.told and self.phase is not Phase.CLOSED:
            self._send(PersonaChanged(personality=personality, previous=previous))
            view.tell(version, personality)
        return self._take()

    def listener_changed(self, up: bool) -> list[Action]:
        """Notifications stopped (they may be missed), or came back (some were missed)."""
        view = self._avatar
        if up and not view.trusted:
            view.missed()
        view.trusted = up
        return self._take()

    def drain_started(self) -> list[Action]:
        """The process is shutting down: new chats are refused, queued ones are answered."""
        self._draining = True
        if self.phase is Phase.OPEN:
            self.phase = Phase.DRAINING
        return self._take()

    # ------------------------------------------------------------------ inputs: the store

    def avatar_loaded(self, avatar: Avatar | None) -> list[Action]:
        view = self._avatar
        read = self._read
        if read is None:
            return self._take()
        if avatar is not None and avatar.version < view.seen:
            if view.seen == read.known:
                view.went_back(avatar)
            elif read.tries < MAX_AVATAR_READS:
                # a change was notified while this read was on its way: the row is older than
                # what this session knows (and may have told its client)
                self._read = _Read(view.epoch, view.seen, read.tries + 1)
                self._out.append(LoadAvatar())
                return self._take()
            else:
                self._read = None
                self._fail_held(Unavailable("the persona keeps changing; try again"))
                return self._take()
        self._read = None
        if self._wait is Wait.HELLO:  # cached only if nothing was notified during the read
            self._welcome(avatar, cache=read.epoch == view.epoch)
            return self._take()
        if avatar is None:
            self._fail_held(NoAvatar())
            return self._take()
        view.saw(avatar)
        if read.epoch == view.epoch:
            view.cached = avatar
        if avatar.version > view.told:
            if view.told_persona:
                # a change the client was not told about (a late or missed notification, a row
                # that went back): tell it now, before the reply
                self._send(
                    PersonaChanged(personality=avatar.personality, previous=view.told_persona)
                )
            view.tell(avatar.version, avatar.personality)
        self._fresh = avatar
        self._resume()
        return self._take()

    def avatar_created(self, avatar: Avatar) -> list[Action]:
        view = self._avatar
        ref = self._held_ref()
        view.clear()
        if avatar.version >= view.seen:  # else a switch was notified meanwhile
            view.cached = avatar
        view.saw(avatar)
        view.tell(avatar.version, avatar.personality)
        card = self.terms.catalogue.card_or_none(avatar.personality)
        greeting = greeting_for(card, avatar.name, self.user_id) if card is not None else ""
        self._send(AvatarFrame(ref=ref, avatar=avatar.info(), greeting=greeting or None))
        self._resume(done=True)
        return self._take()

    def avatar_failed(self, error: ProtocolError) -> list[Action]:
        """A read or a creation of the avatar failed (or, at `hello`, the user's opening)."""
        self._read = None
        if self._wait is Wait.HELLO:
            self._close(CloseCode.INTERNAL_ERROR, "database unavailable")
        else:
            self._fail_held(error)
        return self._take()

    def history_read(self, messages: list[HistoryEntry], now: float) -> list[Action]:
        page = encode(HistoryPage(ref=self._held_ref(), messages=fit_history_page(messages)))
        self._budgets.of(self.user_id, now).spend(len(page), now)
        self._send(page)
        self._resume(done=True)
        return self._take()

    def history_failed(self, error: ProtocolError) -> list[Action]:
        self._fail_held(error)
        return self._take()

    def switch_committed(self, key: int, result: SwitchResult | None) -> list[Action]:
        """The store's answer to `CommitSwitch`: the committed row, or None (no avatar)."""
        switch = self._switches.pop(key)
        view = self._avatar
        untouched = switch.epoch == view.epoch  # nothing emptied the cache since
        view.answered(switch)
        if result is None:
            switch.failure = NoAvatar()
            self._error(switch.failure, switch.ref)
        else:
            avatar = result.avatar
            if untouched and result.newest and avatar.version >= view.seen:
                # the row this switch committed is what a read would find: the next chat
                # renders from it without another round trip
                view.cached = avatar
            view.saw(avatar)
            view.tell(avatar.version, avatar.personality)
            self._meter.switch()
            self._send(
                PersonaSet(ref=switch.ref, personality=avatar.personality, previous=result.previous)
            )
            self._out.append(Publish(avatar.personality, result.previous, avatar.version))
        self._switch_answered(switch)
        return self._take()

    def switch_failed(self, key: int, error: ProtocolError) -> list[Action]:
        switch = self._switches.pop(key)
        self._avatar.answered(switch)
        switch.failure = error
        self._error(error, switch.ref)
        self._switch_answered(switch)
        return self._take()

    # ------------------------------------------------------------------ frames

    def _handle(self, raw: str | bytes, now: float) -> None:
        if self.phase is Phase.AWAITING_HELLO:
            self._hello(raw)
            return
        ref: str | None = None
        try:
            verdict = self._rate.check(now)  # before decoding: garbage costs tokens too
            if verdict is not Verdict.ALLOW:
                limited = RateLimited(details={"rate_per_s": self.terms.limits.rate_per_s})
                if verdict is Verdict.CLOSE:
                    self._error(limited, salvage_ref(raw))
                    self._close(CloseCode.POLICY_VIOLATION, "rate limit exceeded repeatedly")
                    return
                raise limited
            frame = decode_frame(raw)
            ref = frame.id
            self._meter.frame(frame.type)
            self._dispatch(frame, now)
        except ProtocolError as exc:
            if isinstance(exc, BadJson | InvalidFrame):
                self._meter.frame("invalid")
            self._error(exc, ref if ref is not None else salvage_ref(raw))

    def _hello(self, raw: str | bytes) -> None:
        try:
            frame = decode_client_frame(raw)
        except InvalidFrame as exc:
            if frame_type(raw) == "hello":
                self._close(
                    CloseCode.NOT_AUTHENTICATED, close_reason(f"invalid hello: {exc.message}")
                )
            else:
                self._close(CloseCode.NOT_AUTHENTICATED, "send hello first")
            return
        except ProtocolError:
            self._close(CloseCode.NOT_AUTHENTICATED, "send hello first")
            return
        if not isinstance(frame, Hello):
            self._close(CloseCode.NOT_AUTHENTICATED, "send hello first")
            return
        self._meter.frame("hello")
        self._frame = (frame, 0.0)
        self._wait = Wait.HELLO
        self._read = _Read(self._avatar.epoch, self._avatar.seen)
        self._out.append(Authenticate(frame.token))

    def _dispatch(self, frame: ClientFrameRead, now: float) -> None:
        ref = frame.id  # every answer to the frame carries its id
        match frame:
            case ChatFields() | Chat():
                self._chat_frame(frame, now)
            case SetPersonaFields() | SetPersona():
                self._set_persona(frame, frame.personality, now)
            case Cancel():
                self._cancel()
            case GetAvatar():
                avatar = self._current_avatar(frame, now)
                if avatar is not None:
                    self._send(AvatarFrame(ref=ref, avatar=avatar.info()))
            case CreateAvatar():
                self.terms.catalogue.require_enabled(frame.personality)
                if not self._held_for_switches(frame, now):
                    self._hold(frame, now, Wait.CREATE)
                    self._out.append(CreateAvatarAction(frame.name, frame.personality))
            case History():
                self._history(frame, now)
            case Ping():
                self._send(Pong(ref=ref))
            case Hello():
                raise InvalidFrame("already authenticated")

    def _chat_frame(self, frame: Chat | ChatFields, now: float) -> None:
        ref = frame.id
        match commands.parse_chat_text(frame.text):
            case commands.Message(text=text):
                self._enqueue(frame, text, now)
            case commands.SwitchPersona(name=name):
                self._set_persona(frame, name, now)
            case commands.ListPersonas():
                listing = self.terms.catalogue.listing_json()
                self._send(encode_listing(Personas(ref=ref, personas=[]), listing))
            case commands.ShowHelp():
                self._send(Notice(ref=ref, text=commands.HELP_TEXT))
            case commands.UnknownCommand(word=word):
                raise UnknownCommand(f"unknown command '/{word}'; send /help for the list")

    def _history(self, frame: History, now: float) -> None:
        """A page of history, paid for from the user's byte budget (shared by the user's
        connections in this process): past it, `rate_limited` until it has refilled."""
        budget = self._budgets.of(self.user_id, now)
        wait_s = budget.wait_s(now)
        if wait_s > 0:
            raise RateLimited(
                "too much history asked for; wait before asking again",
                details={
                    "retry_after_ms": math.ceil(wait_s * 1000),
                    "history_bytes_per_s": self._budgets.rate,
                },
            )
        budget.spend(HISTORY_REQUEST_BYTES, now)  # the query, whatever it finds
        self._hold(frame, now, Wait.HISTORY)
        self._out.append(ReadHistory(frame.limit, frame.before))

    # ------------------------------------------------------------------ switches

    def _set_persona(self, frame: ClientFrameRead, personality: str, now: float) -> None:
        """The one persona switch, for `set_persona` and `/persona` alike: validate, empty the
        cache, and hand it to the store without waiting; the chats read behind it are rendered
        with its personality, and written once it has committed."""
        self.terms.catalogue.require_enabled(personality)
        view = self._avatar
        if view.full and self._held_for_switches(frame, now):
            return
        view.clear()
        self._keys += 1
        switch = PendingSwitch(self._keys, personality, frame.id, view.epoch)
        view.started(switch)
        self._switches[switch.key] = switch
        self._out.append(CommitSwitch(switch.key, personality))

    def _switch_answered(self, switch: PendingSwitch) -> None:
        self._chats_after(switch)
        if not self._avatar.in_flight and self._wait is Wait.SWITCHES:
            self._wait = Wait.NOTHING
            self._resume()

    # ------------------------------------------------------------------ the avatar

    def _current_avatar(self, frame: ClientFrameRead, now: float) -> Avatar | None:
        """The avatar for the frame being handled, or None when the frame is held up (after this
        session's switches are answered, and a read)."""
        if self._held_for_switches(frame, now):
            return None
        fresh, self._fresh = self._fresh, None
        if fresh is not None:
            return fresh
        cached = self._avatar.usable()
        if cached is not None:
            return cached
        self._hold(frame, now, Wait.AVATAR)
        self._start_read()
        return None

    def _start_read(self) -> None:
        self._read = _Read(self._avatar.epoch, self._avatar.seen)
        self._out.append(LoadAvatar())

    def _welcome(self, avatar: Avatar | None, cache: bool) -> None:
        view = self._avatar
        if avatar is not None:
            if cache:
                view.cached = avatar
            view.saw(avatar)
            view.tell(avatar.version, avatar.personality)
        view.welcomed = True
        terms = self.terms
        welcome = Welcome(
            ref=self._held_ref(),
            session_id=terms.session_id,
            user_id=self.user_id,
            avatar=avatar.info() if avatar is not None else None,
            personas=[],
            server=terms.server_version,
            limits=terms.limits,
        )
        self._send(encode_listing(welcome, terms.catalogue.listing_json()))
        if self.phase is Phase.AWAITING_HELLO:
            self.phase = Phase.DRAINING if self._draining else Phase.OPEN
        self._resume(done=True)

    # ------------------------------------------------------------------ chats

    def _enqueue(self, frame: Chat | ChatFields, text: str, now: float) -> None:
        load = self.load
        # refused before anything is read or written; a draining process says `unavailable`
        if load is not None and load.shedding and self.phase is not Phase.DRAINING:
            load.refuse()
            raise Overloaded(details={"retry_after_ms": load.retry_after_ms})
        switch = self._avatar.deciding()  # read behind it: rendered with its personality
        if switch is not None:
            persona = switch.personality
        else:
            avatar = self._current_avatar(frame, now)
            if avatar is None:
                return  # held up: handled again once the avatar is read
            persona = avatar.personality
        self._accept(frame.id, text, persona, switch, now)

    # ------------------------------------------------------------------ held-up frames

    def _hold(self, frame: ClientFrameRead, now: float, wait: Wait) -> None:
        self._frame = (frame, now)
        self._wait = wait

    def _held_for_switches(self, frame: ClientFrameRead, now: float) -> bool:
        """Hold the frame until this session's switches are answered, if any are in flight."""
        if not self._avatar.in_flight:
            return False
        self._hold(frame, now, Wait.SWITCHES)
        return True

    def _held_ref(self) -> str | None:
        return self._frame[0].id if self._frame is not None else None

    def _fail_held(self, error: ProtocolError) -> None:
        self._error(error, self._held_ref())
        self._resume(done=True)

    def _resume(self, done: bool = False) -> None:
        """Handle the held-up frame again (unless `done`), then the frames behind it."""
        held, self._frame = self._frame, None
        self._wait = Wait.NOTHING
        if held is not None and not done:
            frame, now = held
            try:
                self._dispatch(frame, now)
            except ProtocolError as exc:
                self._error(exc, frame.id)
        self._fresh = None if self._wait is Wait.NOTHING else self._fresh
        while self._wait is Wait.NOTHING and self._backlog and self.phase is not Phase.CLOSED:
            raw, now = self._backlog.popleft()
            self._handle(raw, now)
