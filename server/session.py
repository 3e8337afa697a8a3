"""One connection's session: authentication, the ordered frame loop, the chat queue, the reply."""

from __future__ import annotations

import asyncio
import logging
import math
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
    PersonaInfo,
    Personas,
    Ping,
    Pong,
    ServerFrame,
    SetPersona,
    Welcome,
    close_reason,
    decode_client_frame,
    encode,
    error_frame,
    fit_history_page,
    frame_type,
    salvage_ref,
)
from protocol.personas import CATALOGUE
from server.auth import authenticate
from server.avatar import AvatarState
from server.limits import FrameLimit, Verdict
from server.outbox import Outbox
from server.replies import KNOWN_IDS, PendingChat, Replies
from server.services import Services

log = logging.getLogger(__name__)

HISTORY_REQUEST_BYTES = 1024  # what a history request costs its user's budget besides its page


PERSONA_LIST = [PersonaInfo(id=c.id, name=c.name, description=c.description) for c in CATALOGUE]


class Session:
    """Owns one WebSocket connection from handshake to close."""

    def __init__(self, services: Services, ws: ServerConnection, address: str) -> None:
        self.services = services
        self.settings = services.settings
        self.ws = ws
        self.address = address  # the client's, for the per-address limit before hello
        self.id = uuid.uuid4().hex
        self.user_id = ""
        self.avatar = AvatarState(services, self.id, self._emit, self._emit_error)
        self._replies = Replies(services, "", self.id, self._emit, self._emit_error)  # until hello
        settings = self.settings
        self._rate = FrameLimit(
            settings.rate_per_s, settings.rate_burst, settings.abuse_close_after, time.monotonic()
        )
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
        admission = services.admission
        if not admission.admit(self.address):  # the handshake checked; others came meanwhile
            raise ConnectionRefused(
                CloseCode.TOO_MANY_CONNECTIONS,
                "too many connections waiting to authenticate from your address",
            )
        try:
            hello = await self._read_hello()
        finally:
            admission.authenticated(self.address)
        self.user_id = authenticate(services.secret, hello.token)
        limit = self.settings.max_connections_per_user
        if services.hub.count(self.user_id) >= limit:
            raise ConnectionRefused(
                CloseCode.TOO_MANY_CONNECTIONS, f"too many connections for this user (max {limit})"
            )
        # Join before loading, so that a switch committed meanwhile reaches this session.
        services.hub.join(self.user_id, self.avatar)
        try:
            await self.avatar.load(self.user_id)
            stored_ids = await services.store.recent_chat_ids(self.user_id, KNOWN_IDS)
        except BaseException as exc:
            services.hub.leave(self.user_id, self.avatar)
            if isinstance(exc, Unavailable):
                raise ConnectionRefused(CloseCode.INTERNAL_ERROR, "database unavailable") from None
            raise
        self._replies = Replies(
            services, self.user_id, self.id, self._emit, self._emit_error, stored_ids
        )
        return hello.id

    async def _read_hello(self) -> Hello:
        try:
            async with asyncio.timeout(self.settings.hello_timeout_s):
                raw = await self.ws.recv()
        except TimeoutError:
            raise ConnectionRefused(CloseCode.AUTH_TIMEOUT, "no hello in time") from None
        try:
            frame = decode_client_frame(raw)
        except InvalidFrame as exc:
            if frame_type(raw) != "hello":
                raise ConnectionRefused(CloseCode.NOT_AUTHENTICATED, "send hello first") from None
            reason = close_reason(f"invalid hello: {exc.message}")
            raise ConnectionRefused(CloseCode.NOT_AUTHENTICATED, reason) from None
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
            self.avatar.welcomed = True
            self._emit(self._welcome(hello_ref))
            async for raw in self.ws:
                await self._on_frame(raw)
                if self._closing:
                    break
        finally:
            if self._tasks:  # a close with its own code is under way: let it finish first
                await asyncio.gather(*self._tasks, return_exceptions=True)
            services.hub.leave(self.user_id, self.avatar)
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
            avatar=self.avatar.cached.info() if self.avatar.cached else None,
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
        verdict = self._rate.check(time.monotonic())
        if verdict is Verdict.ALLOW:
            return
        if verdict is Verdict.CLOSE:
            self._close_soon(CloseCode.POLICY_VIOLATION, "rate limit exceeded repeatedly")
        raise RateLimited(details={"rate_per_s": self.settings.rate_per_s})

    async def _dispatch(
        self, frame: Hello | CreateAvatar | GetAvatar | SetPersona | Chat | Cancel | History | Ping
    ) -> None:
        match frame:
            case Chat():
                await self._chat(frame)
            case SetPersona():
                await self.avatar.set_persona(frame.personality, frame.id)
            case Cancel():
                self._replies.cancel()
            case GetAvatar():
                self._emit(Avatar(ref=frame.id, avatar=(await self.avatar.current()).info()))
            case CreateAvatar():
                await self.avatar.create(frame)
            case History():
                await self._history(frame)
            case Ping():
                self._emit(Pong(ref=frame.id))
            case Hello():
                raise InvalidFrame("already authenticated")

    async def _history(self, frame: History) -> None:
        """A page of history, paid for from the user's byte budget (shared by the user's
        connections in this process): past it, `rate_limited` until it has refilled."""
        budget = self.services.history_budgets.of(self.user_id, time.monotonic())
        wait_s = budget.wait_s(time.monotonic())
        if wait_s > 0:
            raise RateLimited(
                "too much history asked for; wait before asking again",
                details={
                    "retry_after_ms": math.ceil(wait_s * 1000),
                    "history_bytes_per_s": self.settings.history_bytes_per_s,
                },
            )
        budget.spend(HISTORY_REQUEST_BYTES, time.monotonic())  # the query, whatever it finds
        messages = await self.services.store.history(self.user_id, frame.limit, frame.before)
        page = encode(HistoryPage(ref=frame.id, messages=fit_history_page(messages)))
        budget.spend(len(page), time.monotonic())
        self._emit(page)

    # ------------------------------------------------------------------ chat

    async def _chat(self, frame: Chat) -> None:
        match commands.parse_chat_text(frame.text):
            case commands.Message(text=text):
                await self._enqueue(frame.id, text)
            case commands.SwitchPersona(name=name):
                await self.avatar.set_persona(name, frame.id)
            case commands.ListPersonas():
                self._emit(Personas(ref=frame.id, personas=PERSONA_LIST))
            case commands.ShowHelp():
                self._emit(Notice(ref=frame.id, text=commands.HELP_TEXT))
            case commands.UnknownCommand(word=word):
                raise UnknownCommand(f"unknown command '/{word}'; send /help for the list")

    async def _enqueue(self, ref: str | None, text: str) -> None:
        switch = self.avatar.switches.deciding()  # rendered after it: with its personality
        if switch is not None:
            persona = switch.personality
        else:
            persona = (await self.avatar.current()).personality
        self._replies.accept(PendingChat(ref, text, persona, time.perf_counter(), switch))
