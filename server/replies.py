"""One session's chats: the waiting queue and the reply in flight, generated, stored, answered."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from protocol.errors import Busy, DuplicateId, NothingToCancel, ProtocolError, Unavailable
from protocol.frames import Reply, ReplyDelta, ReplyStatus, ServerFrame, Usage, encode_reply
from protocol.personas import get_card
from server.deltas import DeltaCoalescer
from server.generators import GeneratorUnavailable, TurnContext
from server.records import StoredTurn, Switch, Turn
from server.render import PastMessage
from server.services import Services

log = logging.getLogger(__name__)

KNOWN_IDS = 256  # chat ids of this user known to be stored, kept to find retries before a write

Emit = Callable[[ServerFrame | bytes], None]  # a frame, or one already encoded
EmitError = Callable[[Exception, str | None], None]


@dataclass(slots=True)
class PendingChat:
    """A chat waiting for its reply, with the persona it was accepted under."""

    ref: str | None
    text: str
    persona: str
    received_at: float
    after: Switch | None = None  # the switch it was rendered after, perhaps not yet committed


@dataclass(slots=True)
class InFlight:
    """The reply being generated right now."""

    chat: PendingChat
    message_id: int | None = None
    reply_id: int | None = None
    task: asyncio.Task[tuple[ReplyStatus, Usage | None]] | None = None
    cancel_requested: bool = False
    parts: list[str] = field(default_factory=list)

    def request_cancel(self) -> None:
        self.cancel_requested = True
        if self.task is not None:
            self.task.cancel()


class Replies:
    """Answers one session's chats one at a time, in order; at most `chat_queue_depth` wait.

    A reply the generator has at once (the template) is committed through the group commit's
    callback, with no task of its own; a reply that streams is generated in a task, so that
    `cancel` can stop it wherever it waits.
    """

    def __init__(
        self,
        services: Services,
        user_id: str,
        session_id: str,
        emit: Emit,
        emit_error: EmitError,
        stored_ids: Iterable[str] = (),
    ) -> None:
        self._services = services
        self._user_id = user_id
        self._session_id = session_id
        self._emit = emit
        self._emit_error = emit_error
        self._queue: deque[PendingChat] = deque()
        self._busy = False  # a chat is being answered
        self._worker: asyncio.Task[None] | None = None  # holds the task answering a chat
        self._inflight: InFlight | None = None
        self._settled: asyncio.Future[None] | None = None  # set when no chat is being answered
        self._recent: deque[PastMessage] = deque(maxlen=2 * services.settings.history_turns)
        # Ids of this user's stored chats (the newest at hello, then this session's): a chat
        # resent with one of them is a retry, answered from storage without entering a batch
        # of writes (where it would fail the batch, written again without it).
        self._stored_ids: OrderedDict[str, None] = OrderedDict.fromkeys(stored_ids)

    @property
    def idle(self) -> bool:
        return not self._busy

    def accept(self, chat: PendingChat) -> None:
        """Queue a chat (or start on it at once); Busy when too many wait or its id is in use."""
        services = self._services
        if services.admission.draining:
            raise Unavailable("the server is shutting down; reconnect in a moment")
        key = (self._user_id, chat.ref) if chat.ref is not None else None
        if key is not None and key in services.chats_in_flight:
            raise Busy("a chat with this id is still being answered")
        if self._busy and len(self._queue) >= services.settings.chat_queue_depth:
            raise Busy(details={"queued": len(self._queue)})
        if key is not None:
            services.chats_in_flight.add(key)
        if self._busy:
            self._queue.append(chat)
        else:
            self._start(chat)

    def cancel(self) -> None:
        inflight = self._inflight
        if inflight is None or inflight.cancel_requested:
            raise NothingToCancel()
        inflight.request_cancel()

    async def finish(self) -> None:
        """The connection is gone: drop waiting chats; the reply in flight is stored cancelled."""
        while self._queue:
            self._release(self._queue.popleft())
        if self._inflight is not None:
            self._inflight.request_cancel()
        if not self._busy:
            return
        if self._settled is None:
            self._settled = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(
                asyncio.shield(self._settled), self._services.settings.drain_timeout_s
            )
        except TimeoutError:
            log.warning("session %s: the reply in flight did not stop in time", self._session_id)

    def _release(self, chat: PendingChat) -> None:
        if chat.ref is not None:
            self._services.chats_in_flight.discard((self._user_id, chat.ref))

    def _start(self, chat: PendingChat) -> None:
        """Answer `chat`: at once when the generator has the whole reply, else in a task."""
        self._busy = True
        try:
            if chat.ref is not None and chat.ref in self._stored_ids:
                log.debug(
                    "session %s: chat %r is a retry of a stored one", self._session_id, chat.ref
                )
                text = None  # answered by the path that looks a chat up first
            else:
                text = self._services.generator.render(self._turn(chat))
        except Exception as exc:
            log.exception("session %s: reply generator crashed", self._session_id)
            self._commit_now(chat, "", "failed", exc)
            return
        if text is not None:
            self._commit_now(chat, text, "completed", None)
            return
        # In flight from now on, not from when the task first runs: a `cancel` right behind
        # this chat (already read from the same packet) must find it.
        inflight = self._inflight = InFlight(chat)
        self._worker = asyncio.create_task(
            self._answer_then_done(chat, functools.partial(self._reply, inflight))
        )

    def _done(self, chat: PendingChat) -> None:
        """`chat` is answered: start on the next one, or become idle."""
        self._release(chat)
        if self._queue:
            self._start(self._queue.popleft())
            return
        self._busy = False
        if self._settled is not None and not self._settled.done():
            self._settled.set_result(None)

    def _turn(self, chat: PendingChat) -> TurnContext:
        # render() is synchronous: it may read the conversation as it is, without a copy
        return TurnContext(card=get_card(chat.persona), text=chat.text, recent=self._recent)

    async def _answer_then_done(
        self, chat: PendingChat, answer: Callable[[], Awaitable[object]]
    ) -> None:
        """The session's task for one chat: answer it (failures become error frames), then go
        on with the queue."""
        try:
            await answer()
        except ProtocolError as exc:  # unavailable, or no avatar for the switch before it
            self._emit_error(exc, chat.ref)
        except Exception as exc:
            log.exception("session %s: answering a chat failed unexpectedly", self._session_id)
            self._emit_error(exc, chat.ref)
        finally:
            self._worker = None
            self._done(chat)

    # ------------------------------------------------------------------ a reply at once

    def _commit_now(
        self, chat: PendingChat, text: str, status: ReplyStatus, failure: Exception | None
    ) -> None:
        def stored(result: StoredTurn | None, error: BaseException | None) -> None:
            self._on_stored(chat, text, status, failure, result, error)

        turn = self._stored_turn(chat, text, status, None)
        self._services.store.add_turn(turn, stored, chat.after)

    def _on_stored(
        self,
        chat: PendingChat,
        text: str,
        status: ReplyStatus,
        failure: Exception | None,
        result: StoredTurn | None,
        error: BaseException | None,
    ) -> None:
        """The group commit's answer for a reply made at once."""
        replaying = False
        try:
            if error is not None:
                if not isinstance(error, ProtocolError):
                    log.error("session %s: commit failed: %r", self._session_id, error)
                self._emit_error(error if isinstance(error, Exception) else Unavailable(), chat.ref)
            elif result is not None and not result.inserted:
                # a retry of a chat stored meanwhile: answer it from storage, then go on
                answer = functools.partial(self._replay, chat)
                self._worker = asyncio.create_task(self._answer_then_done(chat, answer))
                replaying = True
            elif result is not None:
                self._answer_stored(chat, text, status, None, failure, result)
        except Exception as exc:
            log.exception("session %s: answering a reply failed", self._session_id)
            self._emit_error(exc, chat.ref)
        finally:
            if not replaying:
                self._done(chat)

    # ------------------------------------------------------------------ a reply that streams

    async def _reply(self, inflight: InFlight) -> None:
        """Generate, commit, then answer one chat."""
        store = self._services.store
        chat = inflight.chat
        self._inflight = inflight  # from here on, `cancel` applies to this chat
        try:
            # Nothing is sent for a chat before the switch it was rendered after is answered,
            # and nothing is generated for it if that switch failed.
            await self._switch_answered(chat)
            # Deltas carry the reply id, so ids come first; a retried chat is answered from
            # storage before anything is generated again.
            if chat.ref is not None and await self._replay(chat):
                return
            inflight.message_id, inflight.reply_id = await store.reserve_message_ids()
            status, usage, failure = await self._run(inflight)
        finally:
            self._inflight = None
        await self._commit_and_answer(inflight, status, usage, failure)

    async def _switch_answered(self, chat: PendingChat) -> None:
        """Wait for the switch `chat` was rendered after; fail as it did."""
        switch = chat.after
        if switch is None:
            return
        if switch.settled is not None:
            await asyncio.shield(switch.settled)
        failure = switch.failure()
        if failure is not None:
            raise failure

    async def _run(self, inflight: InFlight) -> tuple[ReplyStatus, Usage | None, Exception | None]:
        if inflight.cancel_requested:
            return "cancelled", None, None
        try:
            # its own task, so that `cancel` can stop it wherever it waits
            inflight.task = asyncio.create_task(self._generate(inflight))
            status, usage = await inflight.task
        except (GeneratorUnavailable, Unavailable) as exc:
            log.warning("session %s: reply failed: %s", self._session_id, exc)
            return "failed", None, exc if isinstance(exc, Unavailable) else Unavailable(str(exc))
        except asyncio.CancelledError:
            # Our own `cancel` reached the generation task before it began to run.
            current = asyncio.current_task()
            own = inflight.task is not None and inflight.task.cancelled()
            if not (inflight.cancel_requested and own) or (current and current.cancelling()):
                raise
            return "cancelled", None, None
        except Exception as exc:
            log.exception("session %s: reply generator crashed", self._session_id)
            return "failed", None, exc
        return status, usage, None

    async def _generate(self, inflight: InFlight) -> tuple[ReplyStatus, Usage | None]:
        chat = inflight.chat
        coalescer = self._coalescer(inflight)
        usage: Usage | None = None
        try:
            turn = TurnContext(
                card=get_card(chat.persona), text=chat.text, recent=await self._history()
            )
            async with contextlib.aclosing(self._services.generator.stream(turn)) as pieces:
                async for piece in pieces:
                    if isinstance(piece, Usage):
                        usage = piece
                        continue
                    inflight.parts.append(piece)
                    coalescer.add(piece)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not inflight.cancel_requested or task is None:
                raise
            task.uncancel()  # our own cancel: keep the partial text
            return "cancelled", usage
        finally:
            coalescer.close()
        return "completed", usage

    def _coalescer(self, inflight: InFlight) -> DeltaCoalescer:
        reply_id = inflight.reply_id
        if reply_id is None:
            raise RuntimeError("a reply streams only once its ids are reserved")
        ref = inflight.chat.ref
        settings = self._services.settings
        return DeltaCoalescer(
            lambda delta: self._emit(ReplyDelta(ref=ref, reply_id=reply_id, delta=delta)),
            settings.delta_flush_ms / 1000,
            settings.delta_flush_chars,
        )

    async def _history(self) -> tuple[PastMessage, ...]:
        """The recent conversation a generator sees: from the database when it reads history."""
        settings = self._services.settings
        if not self._services.generator.reads_history:
            return tuple(self._recent)
        return tuple(
            await self._services.store.recent_messages(
                self._user_id, 2 * settings.history_turns, settings.history_chars
            )
        )

    async def _commit_and_answer(
        self,
        inflight: InFlight,
        status: ReplyStatus,
        usage: Usage | None,
        failure: Exception | None,
    ) -> None:
        chat = inflight.chat
        text = "".join(inflight.parts)
        stored = await self._services.store.commit_turn(
            self._stored_turn(chat, text, status, inflight), chat.after
        )
        if not stored.inserted:
            await self._replay(chat)
            return
        self._answer_stored(chat, text, status, usage, failure, stored)

    def _stored_turn(
        self, chat: PendingChat, text: str, status: ReplyStatus, inflight: InFlight | None
    ) -> Turn:
        return Turn(
            user_id=self._user_id,
            persona=chat.persona,
            user_text=chat.text,
            reply_text=text,
            status=status,
            client_id=chat.ref,
            message_id=inflight.message_id if inflight else None,
            reply_id=inflight.reply_id if inflight else None,
        )

    def _answer_stored(
        self,
        chat: PendingChat,
        text: str,
        status: ReplyStatus,
        usage: Usage | None,
        failure: Exception | None,
        stored: StoredTurn,
    ) -> None:
        """The turn is committed: send the reply (or the failure that ended it)."""
        if chat.ref is not None:
            self._stored_id(chat.ref)
        if failure is not None:
            self._emit_error(failure, chat.ref)
            return
        services = self._services
        if status == "completed":
            self._recent.append(PastMessage("user", chat.text))
            self._recent.append(PastMessage("assistant", text))
        services.metrics.replies[status].inc()
        services.metrics.reply_latency.observe(time.perf_counter() - chat.received_at)
        ref, persona = chat.ref, chat.persona
        reply_id, message_id = stored.reply_id, stored.message_id
        if usage is None:  # the usual reply, encoded without building the model
            self._emit(encode_reply(ref, reply_id, message_id, persona, text, status))
            return
        self._emit(
            Reply(
                ref=ref,
                reply_id=reply_id,
                message_id=message_id,
                persona=persona,
                text=text,
                status=status,
                usage=usage,
            )
        )

    def _stored_id(self, ref: str) -> None:
        self._stored_ids[ref] = None
        if len(self._stored_ids) > KNOWN_IDS:
            self._stored_ids.popitem(last=False)

    async def _replay(self, chat: PendingChat) -> bool:
        """Answer a chat whose id is already stored: its stored reply, or `duplicate_id`."""
        assert chat.ref is not None
        stored = await self._services.store.find_turn(self._user_id, chat.ref)
        if stored is None:
            return False
        self._stored_id(chat.ref)
        if stored.user_text != chat.text:
            self._emit_error(DuplicateId(details={"message_id": stored.message_id}), chat.ref)
            return True
        self._services.metrics.replies["replayed"].inc()
        self._emit(
            Reply(
                ref=chat.ref,
                reply_id=stored.reply_id,
                message_id=stored.message_id,
                persona=stored.persona,
                text=stored.reply_text,
                status=stored.status,
                replayed=True,
            )
        )
        return True
