"""One connection's session: authentication, the ordered frame loop, the chat queue, the reply."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from protocol import commands
from protocol.errors import (
    BadJson,
    CloseCode,
    ConnectionRefused,
    InvalidFrame,
    NoAvatar,
    ProtocolError,
    RateLimited,
    Unavailable,
    UnknownCommand,
)
from protocol.frames import (
    Avatar,
    Cancel,
    Chat,
    CreateAvatar,
    GetAvatar,
    Hello,
    History,
    HistoryPage,
    Limits,
    Notice,
    PersonaChanged,
    PersonaInfo,
    Personas,
    PersonaSet,
    Ping,
    Pong,
    ServerFrame,
    SetPersona,
    Welcome,
    decode_client_frame,
    encode,
    error_frame,
    fit_history_page,
    salvage_ref,
)
from protocol.personas import CATALOGUE, require_known
from server.auth import authenticate
from server.limits import TokenBucket
from server.outbox import Outbox
from server.records import Avatar as StoredAvatar
from server.records import Switch, SwitchResult
from server.replies import PendingChat, Replies
from server.services import Services
from server.switches import SwitchesInFlight

log = logging.getLogger(__name__)


PERSONA_LIST = [PersonaInfo(id=c.id, name=c.name, description=c.description) for c in CATALOGUE]
# Reads of the avatar for one chat while changes keep being notified under them; then it fails.
MAX_AVATAR_READS = 5


class Session:
    """Owns one WebSocket connection from handshake to close."""

    def __init__(self, services: Services, ws: ServerConnection) -> None:
        self.services = services
        self.settings = services.settings
        self.ws = ws
        self.id = uuid.uuid4().hex
        self.user_id = ""
        self._avatar: StoredAvatar | None = None
        self._avatar_epoch = 0
        self._persona_version = 0  # the newest avatar version this session has seen
        self._told_version = 0  # the newest one its client was told about
        self._told_persona = ""
        self._welcomed = False
        self._lock = asyncio.Lock()
        self._switches = SwitchesInFlight()
        self._replies = Replies(services, "", self.id, self._emit, self._emit_error)  # until hello
        self._bucket = TokenBucket(self.settings.rate_per_s, self.settings.rate_burst, 0.0)
        self._strikes = 0
        self._last_strike = 0.0
        self._outbox = Outbox(
            ws, self.settings.outbox_limit_bytes, self.settings.send_timeout_s, self._not_reading
        )
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        metrics = self.services.metrics
        metrics.connections.inc()
        try:
            try:
                hello_ref = await self._authenticate()
            except ConnectionRefused as exc:
                log.info("session %s refused: %d %s", self.id, exc.close_code, exc.reason)
                metrics.closes.labels(str(int(exc.close_code))).inc()
                await self.ws.close(exc.close_code, exc.reason)
                return
            await self._serve(hello_ref)
        except ConnectionClosed:
            pass
        finally:
            metrics.connections.dec()

    async def _authenticate(self) -> str | None:
        """Read and check `hello`, join the hub, load the avatar; return the hello's id."""
        services = self.services
        services.preauth += 1
        try:
            hello = await self._read_hello()
        finally:
            services.preauth -= 1
        self.user_id = authenticate(services.secret, hello.token)
        limit = self.settings.max_connections_per_user
        if services.hub.count(self.user_id) >= limit:
            raise ConnectionRefused(
                CloseCode.TOO_MANY_CONNECTIONS, f"too many connections for this user (max {limit})"
            )
        self._replies = Replies(services, self.user_id, self.id, self._emit, self._emit_error)
        # Join before loading, so that a switch committed meanwhile reaches this session.
        services.hub.join(self.user_id, self)
        try:
            epoch = self._avatar_epoch
            avatar = await services.store.open_user(self.user_id)
            while epoch != self._avatar_epoch:  # a switch came in while it loaded
                epoch = self._avatar_epoch
                avatar = await services.store.get_avatar(self.user_id)
        except BaseException as exc:
            services.hub.leave(self.user_id, self)
            if isinstance(exc, Unavailable):
                raise ConnectionRefused(CloseCode.INTERNAL_ERROR, "database unavailable") from None
            raise
        self._avatar = avatar
        if avatar is not None:
            self._seen(avatar)
            self._told(avatar.version, avatar.personality)
        return hello.id

    async def _read_hello(self) -> Hello:
        try:
            async with asyncio.timeout(self.settings.hello_timeout_s):
                raw = await self.ws.recv()
        except TimeoutError:
            raise ConnectionRefused(CloseCode.AUTH_TIMEOUT, "no hello in time") from None
        try:
            frame = decode_client_frame(raw)
        except ProtocolError:
            raise ConnectionRefused(CloseCode.NOT_AUTHENTICATED, "send hello first") from None
        if not isinstance(frame, Hello):
            raise ConnectionRefused(CloseCode.NOT_AUTHENTICATED, "send hello first")
        self.services.metrics.frames["hello"].inc()
        return frame

    async def _serve(self, hello_ref: str | None) -> None:
        services = self.services
        services.metrics.sessions.inc()
        log.info("session %s opened for user %r", self.id, self.user_id)
        try:
            self._welcomed = True
            self._emit(self._welcome(hello_ref))
            async for raw in self.ws:
                await self._on_frame(raw)
                if self._closing:
                    break
        finally:
            if self._tasks:  # a close with its own code is under way: let it finish first
                await asyncio.gather(*self._tasks, return_exceptions=True)
            services.hub.leave(self.user_id, self)
            services.metrics.sessions.dec()
            await self._finish()
            log.info(
                "session %s closed for user %r: %s %s",
                self.id,
                self.user_id,
                self.ws.close_code,
                self.ws.close_reason or "",
            )

    def _welcome(self, ref: str | None) -> Welcome:
        settings = self.settings
        return Welcome(
            ref=ref,
            session_id=self.id,
            user_id=self.user_id,
            avatar=self._avatar.info() if self._avatar else None,
            personas=PERSONA_LIST,
            server=self.services.version,
            limits=Limits(
                max_frame_bytes=settings.max_frame_bytes,
                max_text_chars=settings.max_text_chars,
                rate_per_s=settings.rate_per_s,
                rate_burst=settings.rate_burst,
            ),
        )

    async def _finish(self) -> None:
        """The connection is gone: stop the reply in flight (it is stored as cancelled)."""
        self._closing = True
        await self._replies.finish()

    @property
    def idle(self) -> bool:
        return self._replies.idle

    async def close(self, code: CloseCode, reason: str) -> None:
        self._closing = True
        self.services.metrics.closes.labels(str(int(code))).inc()
        await self.ws.close(code, reason)

    # ------------------------------------------------------------------ output

    def _emit(self, frame: ServerFrame | bytes) -> None:
        """Send a frame (a model, or one already encoded); frames leave in the order they were
        emitted."""
        if self.ws.close_code is None:
            self._outbox.put(frame if isinstance(frame, bytes) else encode(frame))

    def _emit_error(self, exc: Exception, ref: str | None) -> None:
        frame = error_frame(exc, ref)
        self.services.metrics.errors[frame.code].inc()
        self._emit(frame)

    def _not_reading(self) -> None:
        self._close_soon(CloseCode.POLICY_VIOLATION, "client does not read its answers")

    def _close_soon(self, code: CloseCode, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        log.warning("session %s: closing %d: %s", self.id, code, reason)
        task = asyncio.create_task(self.close(code, reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ input

    async def _on_frame(self, raw: str | bytes) -> None:
        ref: str | None = None
        try:
            self._check_rate()  # before decoding: garbage costs tokens too
            frame = decode_client_frame(raw)
            ref = frame.id
            self.services.metrics.frames[frame.type].inc()
            await self._dispatch(frame)
        except ProtocolError as exc:
            if isinstance(exc, BadJson | InvalidFrame):
                self.services.metrics.frames["invalid"].inc()
            if ref is None:
                ref = salvage_ref(raw)
            self._emit_error(exc, ref)
        except Exception as exc:
            log.exception("session %s: unexpected error handling a frame", self.id)
            self._emit_error(exc, ref)

    def _check_rate(self) -> None:
        now = time.monotonic()
        if self._bucket.take(now):
            return
        if now - self._last_strike > 1.0:
            self._strikes = 0
        self._strikes += 1
        self._last_strike = now
        if self._strikes >= self.settings.abuse_close_after:
            self._close_soon(CloseCode.POLICY_VIOLATION, "rate limit exceeded repeatedly")
        raise RateLimited(details={"rate_per_s": self.settings.rate_per_s})

    async def _dispatch(
        self, frame: Hello | CreateAvatar | GetAvatar | SetPersona | Chat | Cancel | History | Ping
    ) -> None:
        store = self.services.store
        match frame:
            case Chat():
                await self._chat(frame)
            case SetPersona():
                await self.set_persona(frame.personality, frame.id)
            case Cancel():
                self._replies.cancel()
            case GetAvatar():
                self._emit(Avatar(ref=frame.id, avatar=(await self._current_avatar()).info()))
            case CreateAvatar():
                await self._create_avatar(frame)
            case History():
                messages = await store.history(self.user_id, frame.limit, frame.before)
                self._emit(HistoryPage(ref=frame.id, messages=fit_history_page(messages)))
            case Ping():
                self._emit(Pong(ref=frame.id))
            case Hello():
                raise InvalidFrame("already authenticated")

    # ------------------------------------------------------------------ avatar and persona

    async def _current_avatar(self) -> StoredAvatar:
        """The cached avatar, or a fresh load (after this session's switches have committed);
        never caches its absence."""
        await self._switches.all_answered()
        avatar = self._avatar
        if avatar is not None and self.services.cache_trusted:
            return avatar
        async with self._lock:
            for _ in range(MAX_AVATAR_READS):
                epoch, known = self._avatar_epoch, self._persona_version
                avatar = await self.services.store.get_avatar(self.user_id)
                if avatar is None:
                    raise NoAvatar()
                if avatar.version >= self._persona_version:
                    break
                if self._persona_version == known:
                    # Older than before the read, and nothing was notified meanwhile: the row
                    # itself went back (a restored database, an avatar made again). Believe it,
                    # and tell the client.
                    log.warning(
                        "session %s: the avatar's version went back from %d to %d",
                        self.id, known, avatar.version,
                    )  # fmt: skip
                    self._persona_version = avatar.version
                    self._told_version = min(self._told_version, avatar.version - 1)
                    break
                # Another connection's change was notified while this read was on its way: the
                # row is older than what this session knows (and may have told its client).
            else:
                raise Unavailable("the persona keeps changing; try again")
            self._seen(avatar)
            if epoch == self._avatar_epoch:
                self._avatar = avatar
        if avatar.version > self._told_version:
            if self._told_version:
                # a change this client was not told about (its notification is late, or was
                # missed while the listener was down): tell it now, before the reply
                self._emit(
                    PersonaChanged(personality=avatar.personality, previous=self._told_persona)
                )
            self._told(avatar.version, avatar.personality)
        return avatar

    def clear_avatar_cache(self) -> None:
        self._avatar = None
        self._avatar_epoch += 1

    def _seen(self, avatar: StoredAvatar) -> None:
        self._persona_version = max(self._persona_version, avatar.version)

    def _told(self, version: int, personality: str) -> None:
        """The client now knows this personality, at this version."""
        if version > self._told_version:
            self._told_version = version
            self._told_persona = personality

    async def _create_avatar(self, frame: CreateAvatar) -> None:
        require_known(frame.personality)
        await self._switches.all_answered()  # a switch sent before must not apply to it
        async with self._lock:
            avatar = await self.services.store.create_avatar(
                self.user_id, frame.name, frame.personality
            )
            self.clear_avatar_cache()
            if avatar.version >= self._persona_version:  # else a switch was notified meanwhile
                self._avatar = avatar
            self._seen(avatar)
            self._told(avatar.version, avatar.personality)
        self._emit(Avatar(ref=frame.id, avatar=avatar.info()))

    async def set_persona(self, personality: str, ref: str | None) -> None:
        """The one persona switch, for `set_persona` and `/persona` alike.

        Validate, clear this session's cached avatar, and hand the switch to the group commit
        without waiting for it: the chats read behind it are rendered with its personality, and
        the store writes them after it, only if it commits. Once it has, refill the cache with
        the committed row, acknowledge, and tell the user's other sessions; the acknowledgement
        leaves before the replies rendered after the switch.
        """
        require_known(personality)
        if self._switches.full:
            await self._switches.all_answered()
        switch = Switch(self.user_id, personality, self.services.origin)
        self.clear_avatar_cache()
        self._switches.started(switch)
        done = functools.partial(self._on_switched, switch, self._avatar_epoch, ref)
        self.services.store.add_switch(switch, done)

    def _on_switched(
        self,
        switch: Switch,
        epoch: int,
        ref: str | None,
        result: SwitchResult | None,
        error: BaseException | None,
    ) -> None:
        """The group commit's answer for this session's switch."""
        services = self.services
        # Nothing else emptied the cache meanwhile (a notification, a listener reconnect, a
        # later switch of this session). Nothing filled it either: loads and create_avatar wait
        # for this session's switches, and an earlier switch refills only an untouched cache.
        untouched = epoch == self._avatar_epoch
        self._switches.answered(switch)
        if error is not None:
            if not isinstance(error, Unavailable):
                log.error("session %s: switch failed: %r", self.id, error)
            self._emit_error(error if isinstance(error, Exception) else Unavailable(), ref)
            return
        if result is None:
            self._emit_error(NoAvatar(), ref)
            return
        avatar, previous = result.avatar, result.previous
        if untouched and result.newest and avatar.version >= self._persona_version:
            # The row this switch committed is what a reload would read now: the next chat
            # renders from it without another round trip. When anything else emptied the
            # cache meanwhile, or a later switch of this user is already committed, it
            # stays empty and the next chat reads the avatar.
            self._avatar = avatar
        self._seen(avatar)
        self._told(avatar.version, avatar.personality)
        services.metrics.persona_switches.inc()
        self._emit(PersonaSet(ref=ref, personality=avatar.personality, previous=previous))
        services.hub.persona_changed(
            self.user_id, avatar.personality, previous, avatar.version, self
        )

    def on_persona_changed(self, personality: str, previous: str, version: int) -> None:
        """Another connection of this user switched persona: forget the cache, tell the client.

        A change no newer than one already loaded does not clear the cache, and one no newer
        than what the client was told is not pushed (notifications can arrive late, or twice),
        so an older persona never comes back.
        """
        if version > self._persona_version:
            self._persona_version = version
            self.clear_avatar_cache()
            # which of this change and a switch of ours in flight commits last is not known
            # yet: chats wait for ours, then read the avatar
            self._switches.contested()
        if self._welcomed and version > self._told_version:
            # before `welcome`, the avatar in it is the new one
            self._emit(PersonaChanged(personality=personality, previous=previous))
            self._told(version, personality)

    # ------------------------------------------------------------------ chat

    async def _chat(self, frame: Chat) -> None:
        match commands.parse_chat_text(frame.text):
            case commands.Message(text=text):
                await self._enqueue(frame.id, text)
            case commands.SwitchPersona(name=name):
                await self.set_persona(name, frame.id)
            case commands.ListPersonas():
                self._emit(Personas(ref=frame.id, personas=PERSONA_LIST))
            case commands.ShowHelp():
                self._emit(Notice(ref=frame.id, text=commands.HELP_TEXT))
            case commands.UnknownCommand(word=word):
                raise UnknownCommand(f"unknown command '/{word}'; send /help for the list")

    async def _enqueue(self, ref: str | None, text: str) -> None:
        switch = self._switches.deciding()  # the chat is rendered after it: with its personality
        if switch is not None:
            persona = switch.personality
        else:
            persona = (await self._current_avatar()).personality
        self._replies.accept(PendingChat(ref, text, persona, time.perf_counter(), switch))
