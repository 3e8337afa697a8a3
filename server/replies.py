"""One session's replies, the one pipeline for every generator: a reply the generator has at
once (the template) is handed back whole; one that streams is generated in a task, its pieces
grouped into deltas, until it ends, fails or is cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.cards import PersonaCard
from protocol.conversation.actions import Action, StartReply
from protocol.conversation.core import Conversation
from protocol.conversation.records import PastMessage
from protocol.errors import Internal, PersonaUnavailable, ProtocolError, Unavailable
from protocol.frames import ReplyStatus, Usage
from server.deltas import DeltaCoalescer
from server.failures import as_protocol_error
from server.generators import GeneratorUnavailable, TurnContext
from server.services import Services

log = logging.getLogger(__name__)

Feed = Callable[[list[Action]], None]


@dataclass(slots=True)
class _Stream:
    """A reply being streamed: its task, and whether `cancel` asked it to stop."""

    key: int
    cancel_requested: bool = False
    started: bool = False
    task: asyncio.Task[None] | None = None
    parts: list[str] = field(default_factory=list)


class Replies:
    """Generates the replies a conversation asks for (`StartReply`), and hands what happens
    back to it as inputs: `reply_started`, `reply_delta`, `reply_ended`, `chat_failed`."""

    def __init__(
        self, services: Services, conversation: Conversation, session_id: str, feed: Feed
    ) -> None:
        self._services = services
        self._conversation = conversation
        self._session_id = session_id
        self._feed = feed
        self._stream: _Stream | None = None
        self._reading: asyncio.Task[None] | None = None

    def start(self, job: StartReply) -> None:
        """Generate the reply, from the persona's card as the catalogue has it now: read again
        first when an edit of it was notified and not read yet (or edits may have been
        missed); `persona_unavailable` when it is disabled or removed."""
        if self._services.catalogue.fresh(job.persona):
            self._start(job)
        else:
            self._reading = asyncio.create_task(self._read_then_start(job))

    async def _read_then_start(self, job: StartReply) -> None:
        try:
            await self._services.catalogue.refresh(job.persona)
        except Exception as exc:
            error = as_protocol_error(exc, self._session_id)
            self._feed(self._conversation.chat_failed(job.key, error))
            return
        finally:
            self._reading = None  # held only so that the task is not collected meanwhile
        self._start(job)

    def _start(self, job: StartReply) -> None:
        conversation = self._conversation
        try:
            card = self._services.catalogue.catalogue.card(job.persona)
        except PersonaUnavailable as exc:
            self._feed(conversation.chat_failed(job.key, exc))
            return
        turn = self._turn(card, job, job.recent)
        try:
            text = self._services.generator.render(turn)
        except Exception:
            log.exception("session %s: reply generator crashed", self._session_id)
            self._feed(conversation.reply_ended(job.key, "", "failed", None, Internal()))
            return
        if text is not None:
            self._feed(conversation.reply_ended(job.key, text, "completed"))
            return
        stream = self._stream = _Stream(job.key)
        stream.task = asyncio.create_task(self._generate(stream, job, card))

    def _turn(
        self, card: PersonaCard, job: StartReply, recent: tuple[PastMessage, ...]
    ) -> TurnContext:
        return TurnContext(
            card=card,
            text=job.text,
            recent=recent,
            others=self._services.catalogue.catalogue.card_or_none,
            avatar_name=job.avatar_name,
            user_name=self._conversation.user_id,
        )

    def cancel(self, key: int) -> None:
        stream = self._stream
        if stream is None or stream.key != key or stream.cancel_requested:
            return
        stream.cancel_requested = True
        if stream.started and stream.task is not None:
            stream.task.cancel()  # wherever it waits; before it started, it checks the flag

    async def _generate(self, stream: _Stream, job: StartReply, card: PersonaCard) -> None:
        """Reserve the reply's ids (its deltas carry one), then stream it; always ends with
        `reply_ended` or `chat_failed`."""
        conversation, store = self._conversation, self._services.store
        try:
            message_id, reply_id = await store.reserve_message_ids()
        except Exception as exc:
            self._stream = None
            self._feed(conversation.chat_failed(job.key, as_protocol_error(exc, self._session_id)))
            return
        self._feed(conversation.reply_started(job.key, message_id, reply_id))
        status, usage, failure = await self._run(stream, job, card)
        self._stream = None
        self._feed(conversation.reply_ended(job.key, "".join(stream.parts), status, usage, failure))

    async def _run(
        self, stream: _Stream, job: StartReply, card: PersonaCard
    ) -> tuple[ReplyStatus, Usage | None, ProtocolError | None]:
        if stream.cancel_requested:
            return "cancelled", None, None
        stream.started = True
        settings = self._services.settings
        coalescer = DeltaCoalescer(
            lambda delta: self._feed(self._conversation.reply_delta(job.key, delta)),
            settings.delta_flush_ms / 1000,
            settings.delta_flush_chars,
        )
        usage: Usage | None = None
        room = settings.llm_max_reply_chars
        try:
            turn = self._turn(card, job, await self._recent(job))
            async with contextlib.aclosing(self._services.generator.stream(turn)) as pieces:
                async for piece in pieces:
                    if isinstance(piece, Usage):
                        usage = piece
                        continue
                    if len(piece) > room:  # an endpoint that does not stop: cut, and failed
                        cut = piece[:room]
                        stream.parts.append(cut)
                        coalescer.add(cut)
                        raise GeneratorUnavailable(
                            f"the model's reply passed {settings.llm_max_reply_chars}"
                            " characters (CHAT_LLM_MAX_REPLY_CHARS); it was cut there"
                        )
                    room -= len(piece)
                    stream.parts.append(piece)
                    coalescer.add(piece)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not stream.cancel_requested or task is None or task.cancelling() > 1:
                raise
            task.uncancel()  # our own cancel: keep the partial text
            return "cancelled", usage, None
        except (GeneratorUnavailable, Unavailable) as exc:
            log.warning("session %s: reply failed: %s", self._session_id, exc)
            return "failed", usage, exc if isinstance(exc, Unavailable) else Unavailable(str(exc))
        except Exception:
            log.exception("session %s: reply generator crashed", self._session_id)
            return "failed", usage, Internal()
        finally:
            coalescer.close()
        return "completed", usage, None

    async def _recent(self, job: StartReply) -> tuple[PastMessage, ...]:
        """The recent conversation a generator sees: from the database when it reads history."""
        services = self._services
        if not services.generator.reads_history:
            return job.recent
        settings = services.settings
        return tuple(
            await services.store.recent_messages(
                self._conversation.user_id, 2 * settings.history_turns, settings.history_chars
            )
        )
