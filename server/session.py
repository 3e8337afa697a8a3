"""One connection's I/O around its conversation (protocol/conversation/core.py): read frames and
feed them in, carry out the actions that come back, and feed in what the I/O returned."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
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
from protocol.conversation.records import SwitchRequest
from protocol.errors import CloseCode
from protocol.frames import Limits, encode
from server.effects import Effects
from server.outbox import Outbox
from server.replies import Replies
from server.services import Services

log = logging.getLogger(__name__)


@functools.cache
def limits_of(
    max_frame_bytes: int, max_text_chars: int, rate_per_s: float, rate_burst: int
) -> Limits:
    """One frozen `Limits` for every session with the same settings (a pydantic model and its
    fields set cost about 500 bytes a session)."""
    return Limits(
        max_frame_bytes=max_frame_bytes,
        max_text_chars=max_text_chars,
        rate_per_s=rate_per_s,
        rate_burst=rate_burst,
    )


def terms_for(services: Services, session_id: str) -> Terms:
    settings = services.settings
    return Terms(
        session_id=session_id,
        server_version=services.version,
        catalogue=services.catalogue.catalogue,
        limits=limits_of(
            settings.max_frame_bytes,
            settings.max_text_chars,
            settings.rate_per_s,
            settings.rate_burst,
        ),
        abuse_close_after=settings.abuse_close_after,
        chat_queue_depth=settings.chat_queue_depth,
        recent_messages=2 * settings.history_turns,
        streams=services.generator.streams,
    )


def forget_handshake(ws: ServerConnection) -> None:
    """Drop the handshake's headers once the app has read what it needs of them.

    websockets reads neither the request nor the response again after the handshake, but keeps
    both for as long as the connection lasts: about 2.4 KiB a session, the headers' dicts and
    strings. The request stays (websockets takes a connection without one to be still in its
    handshake), its headers emptied in place; the response goes.
    """
    if ws.request is not None:
        ws.request.headers.clear()
    ws.response = None


class Session:
    """Owns one WebSocket connection from handshake to close.

    An idle session holds as little as it can (there are tens of thousands per process): no
    event, queue or set of its own while nothing waits. Whether the loop reads is a flag; a
    future is made only while the loop waits for it (`_resume`) or for the reply in flight to
    end (`_settled`); the actions brought back while carrying some out, and the tasks of I/O in
    flight, are kept only while there are some.
    """

    __slots__ = (
        "_actions",
        "_closing",
        "_effects",
        "_outbox",
        "_reading",
        "_replies",
        "_resume",
        "_settled",
        "_tasks",
        "address",
        "conversation",
        "id",
        "services",
        "ws",
    )

    def __init__(self, services: Services, ws: ServerConnection, address: str) -> None:
        self.services = services
        self.ws = ws
        forget_handshake(ws)
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
            load=state.load,
        )
        feed = self._feed  # one bound method for both, not one each
        self._replies = Replies(services, self.conversation, self.id, feed)
        settings = services.settings
        self._outbox = Outbox(
            ws, settings.outbox_limit_bytes, settings.send_timeout_s, self._not_reading
        )
        # While actions are carried out: None, or those they brought back, to carry out next.
        self._actions: list[Action] | None = None
        self._reading = True  # the loop reads frames: the conversation takes them
        self._resume: asyncio.Future[None] | None = None  # the loop waits for `_reading`
        self._settled: asyncio.Future[None] | None = None  # `_finish` waits for the reply
        self._effects = Effects(services, self.conversation, self.id, self, feed)
        self._tasks: set[asyncio.Task[None]] | None = None  # I/O in flight
        self._closing = False

    @property
    def user_id(self) -> str:
        return self._effects.user_id

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
            self._reading = False
            await self._until_reading()  # until welcomed or refused

    async def _serve(self) -> None:
        metrics = self.services.metrics
        metrics.sessions.inc()
        log.info("session %s opened for user %r", self.id, self.user_id)
        try:
            conversation = self.conversation
            while conversation.phase is not Phase.CLOSED:
                if not self._reading:
                    await self._until_reading()
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
        if not self.conversation.idle:
            self._settled = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(self.services.settings.drain_timeout_s):
                    await self._settled
            except TimeoutError:
                log.warning("session %s: the reply in flight did not stop in time", self.id)
            finally:
                self._settled = None
        if self._tasks:  # a close with its own code, or I/O whose answer nobody awaits now
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.user_id:
            self.services.hub.leave(self.user_id, self)

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
        """Carry out `actions` in order; those that carrying them out brings back come after
        them. Then wake the loop if it waits for what the conversation now does: take frames
        again, or be idle."""
        if actions:
            if self._actions is not None:  # carrying out others: these come after them
                self._actions += actions
                return
            self._actions = []
            try:
                for action in actions:
                    self._carry_out(action)
                while self._actions:
                    brought, self._actions = self._actions, []
                    for action in brought:
                        self._carry_out(action)
            finally:
                self._actions = None
        conversation = self.conversation
        reading = conversation.wants_frames or conversation.phase is Phase.CLOSED
        if reading is not self._reading:
            self._set_reading(reading)
        if self._settled is not None and self.conversation.idle:
            settled, self._settled = self._settled, None
            if not settled.done():
                settled.set_result(None)

    def _set_reading(self, reading: bool) -> None:
        self._reading = reading
        if reading and self._resume is not None:
            resume, self._resume = self._resume, None
            if not resume.done():
                resume.set_result(None)

    async def _until_reading(self) -> None:
        """Wait until the loop reads again (`_set_reading(True)`)."""
        resume = self._resume = asyncio.get_running_loop().create_future()
        try:
            await resume
        finally:
            if self._resume is resume:
                self._resume = None

    def _carry_out(self, action: Action) -> None:
        store, effects = self.services.store, self._effects
        match action:
            case Send(frame=frame):
                if self.ws.close_code is None:
                    self._outbox.put(frame if isinstance(frame, bytes) else encode(frame))
            case CommitTurn(key=key, turn=turn):
                store.add_turn(turn, functools.partial(effects.turn_done, key))
            case StartReply():
                self._replies.start(action)
            case CommitSwitch(key=key, personality=personality):
                request = SwitchRequest(self.user_id, personality, self.services.origin)
                store.add_switch(request, functools.partial(effects.switch_done, key))
            case Publish(personality=personality, previous=previous, version=version):
                self.services.hub.persona_changed(
                    self.user_id, personality, previous, version, self
                )
            case CancelReply(key=key):
                self._replies.cancel(key)
            case Replay(key=key, client_id=client_id):
                self._spawn(effects.replay(key, client_id))
            case LoadAvatar():
                self._spawn(effects.load_avatar())
            case CreateAvatar(name=name, personality=personality):
                self._spawn(effects.create_avatar(name, personality))
            case ReadHistory(limit=limit, before=before):
                self._spawn(effects.read_history(limit, before))
            case Authenticate(token=token):
                self._spawn(effects.authenticate(token))
            case Close(code=code, reason=reason):
                self._spawn(self._close(code, reason))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        tasks = self._tasks
        if tasks is not None:
            tasks.discard(task)
            if not tasks:
                self._tasks = None

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
        self._set_reading(True)
        await self.ws.close(code, reason)
