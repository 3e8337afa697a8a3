"""One connection's I/O around its conversation (protocol/conversation/core.py): read frames and
feed them in, carry out the actions that come back, and feed in what the I/O returned."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections import deque
from collections.abc import Coroutine
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from protocol.conversation.actions import (
    Action,
    Authenticate,
    CancelReply,
    Close,
    CommitSwitch,
    CommitTurn,
    CreateAvatar,
    LoadAvatar,
    Publish,
    ReadHistory,
    Replay,
    Send,
    StartReply,
)
from protocol.conversation.base import Phase, Terms
from protocol.conversation.core import Conversation
from protocol.conversation.records import StoredTurn, SwitchRequest, SwitchResult
from protocol.errors import CloseCode, ConnectionRefused, ProtocolError, Unavailable
from protocol.frames import Limits, PersonaInfo, encode
from protocol.personas import CATALOGUE
from server.auth import authenticate
from server.failures import as_protocol_error
from server.outbox import Outbox
from server.replies import Replies
from server.services import Services

log = logging.getLogger(__name__)

PERSONA_LIST = tuple(
    PersonaInfo(id=c.id, name=c.name, description=c.description) for c in CATALOGUE
)
KNOWN_IDS = 256  # ids of the user's newest chats a session starts with (retries are looked up)


def terms_for(services: Services, session_id: str) -> Terms:
    settings = services.settings
    return Terms(
        session_id=session_id,
        server_version=services.version,
        personas=PERSONA_LIST,
        limits=Limits(
            max_frame_bytes=settings.max_frame_bytes,
            max_text_chars=settings.max_text_chars,
            rate_per_s=settings.rate_per_s,
            rate_burst=settings.rate_burst,
        ),
        abuse_close_after=settings.abuse_close_after,
        chat_queue_depth=settings.chat_queue_depth,
        recent_messages=2 * settings.history_turns,
        streams=services.generator.streams,
    )


class Session:
    """Owns one WebSocket connection from handshake to close."""

    def __init__(self, services: Services, ws: ServerConnection, address: str) -> None:
        self.services = services
        self.ws = ws
        self.address = address  # the client's, for the per-address limit before hello
        self.id = uuid.uuid4().hex
        state = services.state
        self.conversation = Conversation(
            terms_for(services, self.id),
            services.metrics.meter(),
            state.claims,
            state.history_budgets,
            time.monotonic(),
            trusted=state.listening,
        )
        self._replies = Replies(services, self.conversation, self.id, self._feed)
        settings = services.settings
        self._outbox = Outbox(
            ws, settings.outbox_limit_bytes, settings.send_timeout_s, self._not_reading
        )
        self._actions: deque[Action] = deque()
        self._carrying = False
        self._reading = asyncio.Event()  # set while the conversation takes frames
        self._reading.set()
        self._idle = asyncio.Event()  # set while no chat is being answered
        self._idle.set()
        self._user_id = ""  # once the token is checked: the hub knows this session by it
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def user_id(self) -> str:
        return self._user_id

    @property
    def idle(self) -> bool:
        return self.conversation.idle

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        metrics = self.services.metrics
        admission = self.services.state.admission
        metrics.connections.inc()
        try:
            if not admission.admit(self.address):  # the handshake checked; others came since
                await self._close(
                    CloseCode.TOO_MANY_CONNECTIONS,
                    "too many connections waiting to authenticate from your address",
                )
                return
            try:
                await self._hello()
            finally:
                admission.authenticated(self.address)
            if self.conversation.phase is Phase.CLOSED:
                return
            await self._serve()
        except ConnectionClosed:
            pass
        finally:
            await self._finish()
            metrics.connections.dec()

    async def _hello(self) -> None:
        """Read the first frame within the deadline; the conversation answers or closes."""
        try:
            async with asyncio.timeout(self.services.settings.hello_timeout_s):
                raw = await self.ws.recv()
        except TimeoutError:
            self._feed(self.conversation.refused(CloseCode.AUTH_TIMEOUT, "no hello in time"))
            return
        self._feed(self.conversation.receive_text(raw, time.monotonic()))
        while self.conversation.phase is Phase.AWAITING_HELLO:
            self._reading.clear()
            await self._reading.wait()  # until welcomed or refused

    async def _serve(self) -> None:
        metrics = self.services.metrics
        metrics.sessions.inc()
        log.info("session %s opened for user %r", self.id, self.user_id)
        try:
            conversation = self.conversation
            while conversation.phase is not Phase.CLOSED:
                if not self._reading.is_set():
                    await self._reading.wait()
                    continue
                raw = await self.ws.recv()
                self._feed(conversation.receive_text(raw, time.monotonic()))
        finally:
            metrics.sessions.dec()
            log.info(
                "session %s closed for user %r: %s %s",
                self.id,
                self.user_id,
                self.ws.close_code,
                self.ws.close_reason or "",
            )

    async def _finish(self) -> None:
        """The connection is gone: stop the reply in flight (it is stored as cancelled) and wait
        for it, then leave the hub."""
        self._feed(self.conversation.connection_lost())
        if not self._idle.is_set():
            try:
                async with asyncio.timeout(self.services.settings.drain_timeout_s):
                    await self._idle.wait()
            except TimeoutError:
                log.warning("session %s: the reply in flight did not stop in time", self.id)
        if self._tasks:  # a close with its own code, or I/O whose answer nobody awaits now
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._user_id:
            self.services.hub.leave(self._user_id, self)

    async def close(self, code: CloseCode, reason: str) -> None:
        """Close from outside (the process is stopping)."""
        await self._close(code, reason)

    def begin_drain(self) -> None:
        self._feed(self.conversation.drain_started())

    # ------------------------------------------------------------------ the hub's inputs

    def on_persona_changed(self, personality: str, previous: str, version: int) -> None:
        self._feed(self.conversation.persona_notified(personality, previous, version))

    def on_listener_changed(self, up: bool) -> None:
        self._feed(self.conversation.listener_changed(up))

    # ------------------------------------------------------------------ carrying out

    def _feed(self, actions: list[Action]) -> None:
        """Carry out `actions` in order (and those that carrying them out brings back)."""
        if actions:
            self._actions.extend(actions)
            if not self._carrying:
                self._carrying = True
                try:
                    while self._actions:
                        self._carry_out(self._actions.popleft())
                finally:
                    self._carrying = False
        conversation = self.conversation
        if conversation.wants_frames or conversation.phase is Phase.CLOSED:
            self._reading.set()
        else:
            self._reading.clear()
        if conversation.idle:
            self._idle.set()
        else:
            self._idle.clear()

    def _carry_out(self, action: Action) -> None:
        store = self.services.store
        match action:
            case Send(frame=frame):
                if self.ws.close_code is None:
                    self._outbox.put(frame if isinstance(frame, bytes) else encode(frame))
            case CommitTurn(key=key, turn=turn):
                store.add_turn(turn, functools.partial(self._turn_done, key))
            case StartReply():
                self._replies.start(action)
            case CommitSwitch(key=key, personality=personality):
                request = SwitchRequest(self.user_id, personality, self.services.origin)
                store.add_switch(request, functools.partial(self._switch_done, key))
            case Publish(personality=personality, previous=previous, version=version):
                self.services.hub.persona_changed(
                    self.user_id, personality, previous, version, self
                )
            case CancelReply(key=key):
                self._replies.cancel(key)
            case Replay(key=key, client_id=client_id):
                self._spawn(self._replay(key, client_id))
            case LoadAvatar():
                self._spawn(self._load_avatar())
            case CreateAvatar(name=name, personality=personality):
                self._spawn(self._create_avatar(name, personality))
            case ReadHistory(limit=limit, before=before):
                self._spawn(self._read_history(limit, before))
            case Authenticate(token=token):
                self._spawn(self._authenticate(token))
            case Close(code=code, reason=reason):
                self._spawn(self._close(code, reason))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ the store's answers

    def _turn_done(self, key: int, stored: StoredTurn | None, error: BaseException | None) -> None:
        conversation = self.conversation
        if stored is not None:
            self._feed(conversation.turn_committed(key, stored, time.monotonic()))
        else:
            self._feed(conversation.chat_failed(key, self._failure(error)))

    def _switch_done(
        self, key: int, result: SwitchResult | None, error: BaseException | None
    ) -> None:
        if error is None:
            self._feed(self.conversation.switch_committed(key, result))
        else:
            self._feed(self.conversation.switch_failed(key, self._failure(error)))

    def _failure(self, error: BaseException | None) -> ProtocolError:
        return as_protocol_error(error or Unavailable(), self.id)

    async def _authenticate(self, token: str) -> None:
        """Check the token, admit the user, read its avatar and its newest chat ids."""
        services = self.services
        conversation = self.conversation
        try:
            user_id = authenticate(services.secret, token)
            limit = services.settings.max_connections_per_user
            if services.hub.count(user_id) >= limit:
                raise ConnectionRefused(
                    CloseCode.TOO_MANY_CONNECTIONS,
                    f"too many connections for this user (max {limit})",
                )
            # Join before reading, so that a switch committed meanwhile reaches this session.
            self._user_id = user_id
            services.hub.join(user_id, self)
            try:
                avatar = await services.store.open_user(user_id)
                stored_ids = await services.store.recent_chat_ids(user_id, KNOWN_IDS)
            except Unavailable:
                raise ConnectionRefused(CloseCode.INTERNAL_ERROR, "database unavailable") from None
        except ConnectionRefused as exc:
            log.info("session %s refused: %d %s", self.id, exc.close_code, exc.reason)
            self._feed(conversation.refused(exc.close_code, exc.reason))
            return
        except Exception as exc:
            as_protocol_error(exc, self.id)
            self._feed(conversation.refused(CloseCode.INTERNAL_ERROR, "internal error"))
            return
        self._feed(conversation.authenticated(user_id, avatar, stored_ids))

    async def _load_avatar(self) -> None:
        try:
            avatar = await self.services.store.get_avatar(self.user_id)
        except Exception as exc:
            self._feed(self.conversation.avatar_failed(as_protocol_error(exc, self.id)))
            return
        self._feed(self.conversation.avatar_loaded(avatar))

    async def _create_avatar(self, name: str, personality: str) -> None:
        try:
            avatar = await self.services.store.create_avatar(self.user_id, name, personality)
        except Exception as exc:
            self._feed(self.conversation.avatar_failed(as_protocol_error(exc, self.id)))
            return
        self._feed(self.conversation.avatar_created(avatar))

    async def _read_history(self, limit: int, before: int | None) -> None:
        try:
            messages = await self.services.store.history(self.user_id, limit, before)
        except Exception as exc:
            self._feed(self.conversation.history_failed(as_protocol_error(exc, self.id)))
            return
        self._feed(self.conversation.history_read(messages, time.monotonic()))

    async def _replay(self, key: int, client_id: str) -> None:
        try:
            past = await self.services.store.find_turn(self.user_id, client_id)
        except Exception as exc:
            self._feed(self.conversation.chat_failed(key, as_protocol_error(exc, self.id)))
            return
        if past is None:
            self._feed(self.conversation.replay_missing(key))
        else:
            log.debug("session %s: chat %r is a retry of a stored one", self.id, client_id)
            self._feed(self.conversation.replay_found(key, past))

    # ------------------------------------------------------------------ closing

    def _not_reading(self) -> None:
        if not self._closing:
            log.warning("session %s: closing 1008: client does not read its answers", self.id)
            self._spawn(self._close(CloseCode.POLICY_VIOLATION, "client does not read its answers"))

    async def _close(self, code: CloseCode, reason: str) -> None:
        """Close once, with the first code asked for."""
        if self._closing:
            return
        self._closing = True
        if code not in (CloseCode.NORMAL, CloseCode.GOING_AWAY):
            log.info("session %s: closing %d: %s", self.id, code, reason)
        self.services.metrics.closes.labels(str(int(code))).inc()
        self._reading.set()
        await self.ws.close(code, reason)
