"""The chat rules: one chat answered at a time, in order, after the switch it was read behind
(and only if that committed); a retried id answered from storage; a reply sent only once its
turn is committed."""

from __future__ import annotations

from collections import deque

from protocol.conversation.actions import Action, CancelReply, CommitTurn, Replay, StartReply
from protocol.conversation.avatar import AvatarView, PendingSwitch
from protocol.conversation.base import Outputs, Phase, Terms
from protocol.conversation.chats import Claims, PendingChat, Step, StoredIds
from protocol.conversation.records import PastMessage, PastTurn, StoredTurn, Turn
from protocol.errors import Busy, DuplicateId, NothingToCancel, ProtocolError, Unavailable
from protocol.frames import Reply, ReplyStatus, Usage, encode_reply, encode_reply_delta

_PAST_CANCEL = frozenset({Step.COMMITTING, Step.READ_BACK})


class ChatRules(Outputs):
    """The conversation's chats (a part of `Conversation`)."""

    terms: Terms
    user_id: str
    _avatar: AvatarView
    _keys: int
    _claims: Claims

    def __init__(self, recent_messages: int) -> None:
        super().__init__()
        # made on first use: most sessions never queue a chat, and an idle one holds neither
        self._queue: deque[PendingChat] | None = None  # waiting behind the one answered
        self._current: PendingChat | None = None
        self._stored_ids = StoredIds()
        self._recent: deque[PastMessage] | None = None  # the last `recent_messages`, in order
        self._recent_messages = recent_messages

    @property
    def idle(self) -> bool:
        """No chat is being answered or waits to be."""
        return self._current is None and not self._queue

    # ------------------------------------------------------------------ inputs

    def replay_found(self, key: int, past: PastTurn) -> list[Action]:
        """The chat's id is stored: answer with the stored reply (the same text), or refuse."""
        chat = self._chat(key)
        if chat is None:
            return self._take()
        if chat.ref is not None:
            self._stored_ids.add(chat.ref)
        if past.user_text != chat.text:
            self._error(DuplicateId(details={"message_id": past.message_id}), chat.ref)
        else:
            self._meter.reply("replayed", None)
            self._send(
                Reply(
                    ref=chat.ref,
                    reply_id=past.reply_id,
                    message_id=past.message_id,
                    persona=past.persona,
                    text=past.reply_text,
                    status=past.status,
                    replayed=True,
                )
            )
        self._finish(chat)
        return self._take()

    def replay_missing(self, key: int) -> list[Action]:
        chat = self._chat(key)
        if chat is None:
            return self._take()
        if chat.step is Step.READ_BACK:  # stored, then gone: nothing to answer with
            self._error(Unavailable("the stored chat could not be read back; try again"), chat.ref)
            self._finish(chat)
        else:
            self._generate(chat)
        return self._take()

    def turn_committed(self, key: int, stored: StoredTurn, now: float) -> list[Action]:
        """The chat and its reply are durable: send the reply (or the failure that ended it)."""
        chat = self._chat(key)
        if chat is None:
            return self._take()
        if not stored.inserted:  # a retry of a chat stored meanwhile: answer from storage
            assert chat.ref is not None
            chat.step = Step.READ_BACK
            self._out.append(Replay(chat.key, chat.ref))
            return self._take()
        if chat.ref is not None:
            self._stored_ids.add(chat.ref)
        if chat.failure is not None:
            self._error(chat.failure, chat.ref)
        else:
            self._answer(chat, stored, now)
        self._finish(chat)
        return self._take()

    def chat_failed(self, key: int, error: ProtocolError) -> list[Action]:
        """The I/O for a chat failed (its lookup, its ids, its commit): answer with the error."""
        chat = self._chat(key)
        if chat is not None:
            self._error(error, chat.ref)
            self._finish(chat)
        return self._take()

    # ------------------------------------------------------------------ inputs: the generator

    def reply_started(self, key: int, message_id: int, reply_id: int) -> list[Action]:
        """The ids a streamed reply is stored under (its deltas carry `reply_id`)."""
        chat = self._chat(key)
        if chat is not None:
            chat.message_id, chat.reply_id = message_id, reply_id
        return self._take()

    def reply_delta(self, key: int, text: str) -> list[Action]:
        chat = self._chat(key)
        if chat is not None and chat.reply_id is not None:
            self._send(encode_reply_delta(chat.ref, chat.reply_id, text))
        return self._take()

    def reply_ended(
        self,
        key: int,
        text: str,
        status: ReplyStatus,
        usage: Usage | None = None,
        failure: ProtocolError | None = None,
    ) -> list[Action]:
        """The generator is done (`failure`: why a failed reply failed): commit the turn."""
        chat = self._chat(key)
        if chat is not None:
            self._commit(chat, text, status, usage, failure)
        return self._take()

    # ------------------------------------------------------------------ rules

    def _accept(
        self, ref: str | None, text: str, persona: str, after: PendingSwitch | None, now: float
    ) -> None:
        """Queue a chat read with `persona` (behind `after`, perhaps not answered yet); `busy`
        when too many wait or its id is being answered."""
        if self.phase is Phase.DRAINING:
            raise Unavailable("the server is shutting down; reconnect in a moment")
        if ref is not None and self._claims.holds(self.user_id, ref):
            raise Busy("a chat with this id is still being answered")
        queue = self._queue
        waiting = len(queue) if queue is not None else 0
        if self._current is not None and waiting >= self.terms.chat_queue_depth:
            raise Busy(details={"queued": waiting})
        if ref is not None:
            self._claims.claim(self.user_id, ref)
        self._keys += 1
        chat = PendingChat(self._keys, ref, text, persona, now, after)
        if self._current is None and not queue:  # the usual case: answered at once
            self._current = chat
            self._begin(chat)
            return
        if queue is None:
            queue = self._queue = deque()
        queue.append(chat)
        self._advance()

    def _cancel(self) -> None:
        chat = self._current
        if chat is None or chat.cancel_requested or chat.step in _PAST_CANCEL:
            raise NothingToCancel()
        self._request_cancel(chat)

    def _drop_chats(self) -> None:
        """The connection is gone: waiting chats are dropped, the reply in flight is cancelled
        (it is still stored, as cancelled)."""
        while self._queue:
            self._release(self._queue.popleft())
        chat = self._current
        if chat is not None:
            chat.interrupted = True
            if not chat.cancel_requested:
                self._request_cancel(chat)

    def _chats_after(self, switch: PendingSwitch) -> None:
        """`switch` has its answer: the chat waiting for it goes on."""
        chat = self._current
        if chat is not None and chat.step is Step.AFTER_SWITCH and chat.after is switch:
            self._begin(chat)

    def _advance(self) -> None:
        """Start on the next chat, when none is being answered."""
        while self._current is None and self._queue:
            chat = self._current = self._queue.popleft()
            self._begin(chat)

    def _begin(self, chat: PendingChat) -> None:
        """The chat is the one being answered: after its switch, look its id up or generate."""
        switch = chat.after
        if switch is not None:
            if not switch.answered:
                chat.step = Step.AFTER_SWITCH
                return
            failure = switch.chat_failure()
            if failure is not None:  # nothing is generated for it
                self._error(failure, chat.ref)
                self._finish(chat)
                return
        if chat.ref is not None and (self.terms.streams or chat.ref in self._stored_ids):
            # a retry is answered from storage, not generated again
            chat.step = Step.LOOKUP
            self._out.append(Replay(chat.key, chat.ref))
            return
        self._generate(chat)

    def _generate(self, chat: PendingChat) -> None:
        if chat.cancel_requested:
            self._commit(chat, "", "cancelled", None, None)
            return
        chat.step = Step.GENERATING
        self._out.append(
            StartReply(
                chat.key, chat.persona, chat.text, tuple(self._recent or ()), self._avatar.name
            )
        )

    def _request_cancel(self, chat: PendingChat) -> None:
        chat.cancel_requested = True
        if chat.step is Step.GENERATING:
            self._out.append(CancelReply(chat.key))

    def _commit(
        self,
        chat: PendingChat,
        text: str,
        status: ReplyStatus,
        usage: Usage | None,
        failure: ProtocolError | None,
    ) -> None:
        chat.step = Step.COMMITTING
        if status == "cancelled" and chat.interrupted:
            status = "interrupted"
        chat.usage, chat.failure = usage, failure
        if "\x00" in text:  # a generator's text: PostgreSQL text cannot hold a NUL, and one
            text = text.replace("\x00", "\ufffd")  # would fail its whole group commit
        chat.turn = Turn(
            user_id=self.user_id,
            persona=chat.persona,
            user_text=chat.text,
            reply_text=text,
            status=status,
            client_id=chat.ref,
            message_id=chat.message_id,
            reply_id=chat.reply_id,
            error_code=failure.code if failure is not None else None,
        )
        self._out.append(CommitTurn(chat.key, chat.turn))

    def _answer(self, chat: PendingChat, stored: StoredTurn, now: float) -> None:
        assert chat.turn is not None
        text, status = chat.turn.reply_text, chat.turn.status
        if status == "completed":
            recent = self._recent
            if recent is None:
                recent = self._recent = deque(maxlen=self._recent_messages)
            recent.append(PastMessage("user", chat.text, chat.persona))
            recent.append(PastMessage("assistant", text, chat.persona))
        self._meter.reply(status, now - chat.received_at)
        if chat.usage is None:  # the usual reply, encoded without building the model
            self._send(
                encode_reply(
                    chat.ref, stored.reply_id, stored.message_id, chat.persona, text, status
                )
            )
            return
        self._send(
            Reply(
                ref=chat.ref,
                reply_id=stored.reply_id,
                message_id=stored.message_id,
                persona=chat.persona,
                text=text,
                status=status,
                usage=chat.usage,
            )
        )

    def _finish(self, chat: PendingChat) -> None:
        """`chat` is answered: on to the next one."""
        self._release(chat)
        if self._current is chat:
            self._current = None
        self._advance()

    def _release(self, chat: PendingChat) -> None:
        if chat.ref is not None:
            self._claims.release(self.user_id, chat.ref)

    def _chat(self, key: int) -> PendingChat | None:
        chat = self._current
        return chat if chat is not None and chat.key == key else None
