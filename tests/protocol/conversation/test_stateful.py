"""Two conversations of one user against a model of the world, driven by hypothesis in every
order: chats and switches (valid or not), commits that succeed or fail, reads that return the
row as it is or as it was, other processes' switches notified late or lost, cancels, retries of
the same id, the listener going down and up, and the drain.

After every step, what each client received must keep the protocol's promises: a reply carries
a persona the client could expect (the one of its last switch, or one it was told of since; as
the load-test bots check), no reply goes out before its turn is committed, every answer carries
the `ref` of a frame waiting for one, and no older persona is pushed after a newer one. At the
end everything is answered.

`HYPOTHESIS_EXAMPLES` sets the number of examples (2,000 by default).
"""

from __future__ import annotations

import os
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from protocol.conversation.actions import (
    Action,
    CancelReply,
    Close,
    CommitSwitch,
    CommitTurn,
    LoadAvatar,
    Publish,
    ReadHistory,
    Replay,
    Send,
    StartReply,
)
from protocol.conversation.chats import Claims
from protocol.conversation.limits import UserBudgets
from protocol.conversation.records import PastTurn, StoredTurn, SwitchResult, Turn
from protocol.errors import Unavailable
from protocol.frames import encode
from tests.protocol.conversation.harness import USER, Talk, avatar

EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "2000"))
PERSONAS = ["friendly", "playful", "caring", "witty", "professional", "romantic"]
FINAL = {"reply", "error", "persona_set", "avatar", "history", "pong", "notice", "personas"}


@dataclass
class SentChat:
    """What the client may expect of a chat's reply, fixed when it sent the chat."""

    text: str
    told_at: int  # how many personas the client had been told of when it sent the chat
    switch: str | None  # the ref of the switch it sent just before, if still unanswered


@dataclass
class SentSwitch:
    target: str
    told_at: int
    answered: bool = False
    failed: bool = False


@dataclass
class Client:
    """One connection, as its client sees it, and what the world owes it."""

    talk: Talk
    told: list[str] = field(default_factory=lambda: ["friendly"])  # welcome, then in order
    told_versions: list[tuple[int, str]] = field(default_factory=lambda: [(1, "friendly")])
    accepted: set[int] = field(default_factory=set)  # keys of chats the conversation took
    waiting: Counter[str] = field(default_factory=Counter)  # refs that wait for an answer
    may_answer: Counter[str] = field(default_factory=Counter)  # cancels: answered if refused
    chats: dict[str, SentChat] = field(default_factory=dict)
    switches: dict[str, SentSwitch] = field(default_factory=dict)
    last_switch: str | None = None
    answered_chats: list[tuple[str, str]] = field(default_factory=list)  # (ref, text)
    pushed_versions: list[int] = field(default_factory=list)
    loads: deque[tuple[str, int, int]] = field(default_factory=deque)  # row when asked, and
    # how many times the listener had come back by then
    starts: dict[int, str] = field(default_factory=dict)  # key -> persona
    cancelled: set[int] = field(default_factory=set)
    replays: dict[int, str] = field(default_factory=dict)
    histories: int = 0
    ids: int = 0
    closed: bool = False


class TwoConversations(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clients: list[Client] = []
        self.row = ("friendly", 1)  # the avatar in the database: personality, version
        self.stored: dict[str, tuple[str, str, int]] = {}  # client id -> text, persona, id
        self.next_message = 100
        self.switch_queue: deque[tuple[int, int, str]] = deque()  # FIFO, as the group commit
        self.switch_answers: deque[tuple[int, int, SwitchResult | None]] = deque()
        self.turn_queue: deque[tuple[int, int, Turn]] = deque()
        self.inbox: list[deque[tuple[str, str, int]]] = [deque(), deque()]
        self.listening = True
        self.reconnects = 0
        self.committed: set[tuple[int, int]] = set()  # (client, chat key) stored
        self.history = {1: "friendly"}  # every version the avatar had
        self.known = [1, 1]  # per conversation: the newest version it was informed of
        self.switch_versions: dict[tuple[int, int], int] = {}  # (client, key) -> committed as

    @initialize(streams=st.booleans())
    def open_two(self, streams: bool) -> None:
        claims = Claims()
        budgets = UserBudgets(1e12, 1e12)
        for _ in range(2):
            talk = Talk(claims=claims, budgets=budgets, streams=streams)
            talk.conv.receive_text('{"type": "hello", "token": "t"}', talk.now)
            client = Client(talk)
            self.clients.append(client)
            self._feed(
                0 if len(self.clients) == 1 else 1,
                talk.conv.authenticated(USER, avatar(*self.row), ()),
            )
        # a high rate: this machine checks the rules, not the limit
        for client in self.clients:
            client.talk.conv._rate._bucket.rate = 1e9
            client.talk.conv._rate._bucket.burst = 1e9

    # ------------------------------------------------------------------ feeding and checking

    def _feed(
        self, index: int, actions: list[Action], version: int | None = None, via: str = ""
    ) -> None:
        client = self.clients[index]
        for action in actions:
            match action:
                case Send(frame=frame):
                    data = frame if isinstance(frame, bytes) else encode(frame)
                    self._receive(index, orjson.loads(data), version, via)
                case Close():
                    client.closed = True
                case LoadAvatar():
                    client.loads.append((*self.row, self.reconnects))
                case CommitSwitch(key=key, personality=personality):
                    self.switch_queue.append((index, key, personality))
                case Publish(personality=personality, previous=previous, version=published):
                    other = 1 - index
                    self.known[other] = max(self.known[other], published)
                    conv = self.clients[other].talk.conv
                    self._feed(
                        other, conv.persona_notified(personality, previous, published), published
                    )
                case StartReply(key=key, persona=persona):
                    client.starts[key] = persona
                case CancelReply(key=key):
                    client.cancelled.add(key)
                case CommitTurn(key=key, turn=turn):
                    self.turn_queue.append((index, key, turn))
                case Replay(key=key, client_id=client_id):
                    client.replays[key] = client_id
                case ReadHistory():
                    client.histories += 1
                case _:
                    raise AssertionError(f"unexpected action {action!r}")
        self._check_accepted(index)  # after what was sent with it: a push comes first

    def _receive(self, index: int, frame: dict[str, Any], version: int | None, via: str) -> None:
        client = self.clients[index]
        kind, ref = frame["type"], frame.get("ref")
        if kind == "persona_changed":
            assert version is not None, frame
            assert not client.pushed_versions or version > client.pushed_versions[-1], (
                "an older persona was pushed after a newer one",
                client.pushed_versions,
                version,
            )
            client.pushed_versions.append(version)
            client.told.append(frame["personality"])
            client.told_versions.append((version, frame["personality"]))
            return
        if kind == "reply_delta":
            assert ref is None or client.waiting[ref] > 0, frame
            return
        if kind == "welcome":
            return
        assert kind in FINAL, frame
        assert ref is not None, frame
        if client.may_answer[ref] > 0:
            assert (kind, frame["code"]) == ("error", "nothing_to_cancel"), frame
            client.may_answer[ref] -= 1
            return
        assert client.waiting[ref] > 0, ("an answer to nothing", frame)
        client.waiting[ref] -= 1
        switch = client.switches.get(ref)
        if switch is not None and not switch.answered:
            switch.answered = True
            if kind == "persona_set":
                assert frame["personality"] == switch.target
                assert version is not None
                client.told.append(switch.target)
                client.told_versions.append((version, switch.target))
            else:
                switch.failed = True
        if ref in client.chats:
            chat = client.chats.pop(ref)
            client.answered_chats.append((ref, chat.text))
            if kind == "reply":
                assert via in ("turn_committed", "replay_found"), ("a reply before its commit", via)
                if not frame.get("replayed"):
                    assert frame["persona"] in self._acceptable(client, chat), (
                        "a stale render",
                        frame["persona"],
                        client.told,
                        chat,
                    )

    def _check_accepted(self, index: int) -> None:
        """A chat takes its persona when the conversation accepts it: the one of the switch it
        was read behind, or else the newest its client has been told of (a newer one read is
        pushed first, an older one read again)."""
        client = self.clients[index]
        conv = client.talk.conv
        chats = [conv._current, *(conv._queue or ())]
        known = self.known[index]
        for chat in chats:
            if chat is None or chat.key in client.accepted:
                continue
            client.accepted.add(chat.key)
            if chat.after is not None:
                assert chat.persona == chat.after.personality
                committed = self.switch_versions.get((index, chat.after.key))
                assert committed is None or committed >= known, (
                    "a chat took the persona of a switch older than a change it knew of",
                    committed,
                    known,
                )
            else:
                current = self.row[1]
                possible = {self.history[v] for v in range(known, current + 1)}
                assert chat.persona in possible, (
                    "a chat took a persona older than a change its conversation knew of",
                    chat.persona,
                    known,
                    self.history,
                )
                newest = max(client.told_versions)[1]
                assert chat.persona == newest, (
                    "a chat took an older persona than its client was told of",
                    chat.persona,
                    client.told_versions,
                )

    def _acceptable(self, client: Client, chat: SentChat) -> set[str]:
        told_since = client.told[chat.told_at :]
        if chat.switch is None:
            return {client.told[chat.told_at - 1], *told_since}
        switch = client.switches[chat.switch]
        acceptable = {switch.target, *client.told[switch.told_at :]}
        if switch.failed:
            acceptable.add(client.told[switch.told_at - 1])
        return acceptable

    def _send(self, index: int, **fields: Any) -> None:
        client = self.clients[index]
        client.ids += 1
        ref = fields.setdefault("id", f"f{index}-{client.ids}")
        client.waiting[ref] += 1
        talk = client.talk
        self._feed(index, talk.conv.receive_text(orjson.dumps(fields).decode(), talk.tick()))

    # ------------------------------------------------------------------ the clients

    @rule(index=st.integers(0, 1), text=st.sampled_from(["hi", "tell me more", "ok"]))
    def chat(self, index: int, text: str) -> None:
        client = self.clients[index]
        ref = f"c{index}-{client.ids + 1}"
        last = client.switches.get(client.last_switch or "")
        switch = client.last_switch if last is not None and not last.answered else None
        client.chats[ref] = SentChat(text, len(client.told), switch)
        self._send(index, type="chat", id=ref, text=text)

    @rule(
        index=st.integers(0, 1),
        persona=st.sampled_from([*PERSONAS, "grumpy"]),
        command=st.booleans(),
    )
    def switch(self, index: int, persona: str, command: bool) -> None:
        client = self.clients[index]
        ref = f"s{index}-{client.ids + 1}"
        if persona != "grumpy":
            client.switches[ref] = SentSwitch(persona, len(client.told))
            client.last_switch = ref
        if command:
            self._send(index, type="chat", id=ref, text=f"/persona {persona}")
        else:
            self._send(index, type="set_persona", id=ref, personality=persona)

    @rule(index=st.integers(0, 1))
    def cancel(self, index: int) -> None:
        """A cancel that applies is answered by its chat's reply; one that does not, itself."""
        client = self.clients[index]
        client.ids += 1
        ref = f"x{index}-{client.ids}"
        client.may_answer[ref] += 1
        talk = client.talk
        raw = orjson.dumps({"type": "cancel", "id": ref}).decode()
        self._feed(index, talk.conv.receive_text(raw, talk.tick()))

    @rule(index=st.integers(0, 1), kind=st.sampled_from(["get_avatar", "ping", "history"]))
    def ask(self, index: int, kind: str) -> None:
        self._send(index, type=kind)

    def _retryable(self) -> list[tuple[str, str]]:
        """Answered chats whose id waits for no answer now, on either connection."""
        return [
            (ref, text)
            for client in self.clients
            for ref, text in client.answered_chats
            if not any(c.waiting[ref] for c in self.clients)
        ]

    @precondition(lambda self: self._retryable())
    @rule(index=st.integers(0, 1), data=st.data())
    def retry(self, index: int, data: st.DataObject) -> None:
        """Send an answered chat again, with its id and text (on either connection)."""
        ref, text = data.draw(st.sampled_from(self._retryable()))
        client = self.clients[index]
        client.chats[ref] = SentChat(text, len(client.told), None)
        client.waiting[ref] += 1
        self._feed(index, client.talk.conv.receive_text(
            orjson.dumps({"type": "chat", "id": ref, "text": text}).decode(), client.talk.tick()
        ))  # fmt: skip

    # ------------------------------------------------------------------ the store

    @precondition(lambda self: self.switch_queue)
    @rule(commits=st.booleans())
    def commit_switch(self, commits: bool) -> None:
        """The store commits the oldest switch (or fails it); its answer comes later."""
        index, key, personality = self.switch_queue.popleft()
        if not commits:
            self.switch_answers.append((index, key, None))
            return
        previous, version = self.row
        self.row = (personality, version + 1)
        self.history[version + 1] = personality
        self.switch_versions[(index, key)] = version + 1
        result = SwitchResult(avatar(personality, version + 1), previous, True)
        self.switch_answers.append((index, key, result))

    @precondition(lambda self: self.switch_answers)
    @rule()
    def answer_switch(self) -> None:
        index, key, result = self.switch_answers.popleft()
        conv = self.clients[index].talk.conv
        if result is None:
            self._feed(index, conv.switch_failed(key, Unavailable()))
        else:
            version = result.avatar.version
            self.known[index] = max(self.known[index], version)
            self._feed(index, conv.switch_committed(key, result), version, "switch_committed")

    @precondition(lambda self: self.turn_queue)
    @rule(commits=st.booleans())
    def answer_turn(self, commits: bool) -> None:
        index, key, turn = self.turn_queue.popleft()
        talk = self.clients[index].talk
        if not commits:
            self._feed(index, talk.conv.chat_failed(key, Unavailable()))
            return
        found = self.stored.get(turn.client_id) if turn.client_id else None
        if found is not None:
            stored = StoredTurn(found[2], found[2] + 1, inserted=False)
        else:
            self.next_message += 2
            stored = StoredTurn(self.next_message, self.next_message + 1, inserted=True)
            if turn.client_id:
                self.stored[turn.client_id] = (turn.user_text, turn.persona, self.next_message)
        self.committed.add((index, key))
        self._feed(index, talk.conv.turn_committed(key, stored, talk.tick()), via="turn_committed")

    @precondition(lambda self: any(c.loads for c in self.clients))
    @rule(data=st.data(), as_asked=st.booleans())
    def answer_load(self, data: st.DataObject, as_asked: bool) -> None:
        """The row as it was when asked, or as it is now (a read sees either)."""
        index = data.draw(st.sampled_from([i for i, c in enumerate(self.clients) if c.loads]))
        self._answer_load(index, as_asked)

    def _answer_load(self, index: int, as_asked: bool) -> None:
        client = self.clients[index]
        personality, version, reconnects = client.loads.popleft()
        if not as_asked or reconnects != self.reconnects:
            # a read in flight while the listener came back may see a change missed meanwhile
            # or not; the model lets it see it, as it counts it known from the reconnect on
            personality, version = self.row
        self.known[index] = max(self.known[index], version)
        self._feed(index, client.talk.conv.avatar_loaded(avatar(personality, version)), version)

    @precondition(lambda self: any(c.starts for c in self.clients))
    @rule(data=st.data(), fails=st.booleans())
    def answer_reply(self, data: st.DataObject, fails: bool) -> None:
        index = data.draw(st.sampled_from([i for i, c in enumerate(self.clients) if c.starts]))
        self._answer_reply(index, fails)

    def _answer_reply(self, index: int, fails: bool) -> None:
        client = self.clients[index]
        key, persona = client.starts.popitem()
        conv = client.talk.conv
        if client.talk.conv.terms.streams:
            self._feed(index, conv.reply_started(key, 1, 2))
            self._feed(index, conv.reply_delta(key, f"{persona} says"))
        if key in client.cancelled:
            self._feed(index, conv.reply_ended(key, "partial", "cancelled"))
        elif fails:
            self._feed(index, conv.reply_ended(key, "", "failed", None, Unavailable()))
        else:
            self._feed(index, conv.reply_ended(key, f"{persona} says hi", "completed"))

    @precondition(lambda self: any(c.replays for c in self.clients))
    @rule(data=st.data())
    def answer_replay(self, data: st.DataObject) -> None:
        index = data.draw(st.sampled_from([i for i, c in enumerate(self.clients) if c.replays]))
        self._answer_replay(index)

    def _answer_replay(self, index: int) -> None:
        client = self.clients[index]
        key, client_id = client.replays.popitem()
        found = self.stored.get(client_id)
        conv = client.talk.conv
        if found is None:
            self._feed(index, conv.replay_missing(key))
        else:
            past = PastTurn(found[2], found[0], found[2] + 1, found[1], "stored", "completed")
            self._feed(index, conv.replay_found(key, past), via="replay_found")

    @precondition(lambda self: any(c.histories for c in self.clients))
    @rule(data=st.data())
    def answer_history(self, data: st.DataObject) -> None:
        index = data.draw(st.sampled_from([i for i, c in enumerate(self.clients) if c.histories]))
        self._answer_history(index)

    def _answer_history(self, index: int) -> None:
        client = self.clients[index]
        client.histories -= 1
        self._feed(index, client.talk.conv.history_read([], client.talk.tick()))

    # ------------------------------------------------------------------ the rest of the world

    @rule(persona=st.sampled_from(PERSONAS), at_once=st.booleans())
    def another_process_switches(self, persona: str, at_once: bool) -> None:
        """A switch of another process; notified later (or lost), or `at_once`."""
        previous, version = self.row
        self.row = (persona, version + 1)
        self.history[version + 1] = persona
        if self.listening:
            for inbox in self.inbox:
                inbox.append((persona, previous, version + 1))
            if at_once:
                for index in (0, 1):
                    self._notify(index)

    @precondition(lambda self: any(self.inbox))
    @rule(data=st.data())
    def notify(self, data: st.DataObject) -> None:
        self._notify(data.draw(st.sampled_from([i for i, box in enumerate(self.inbox) if box])))

    def _notify(self, index: int) -> None:
        personality, previous, version = self.inbox[index].popleft()
        conv = self.clients[index].talk.conv
        self.known[index] = max(self.known[index], version)
        self._feed(index, conv.persona_notified(personality, previous, version), version)

    @rule()
    def listener_goes_down(self) -> None:
        self.listening = False
        for inbox in self.inbox:
            inbox.clear()  # notifications are lost with the connection
        for index, client in enumerate(self.clients):
            self._feed(index, client.talk.conv.listener_changed(False))

    @precondition(lambda self: not self.listening)
    @rule()
    def listener_comes_back(self) -> None:
        self.listening = True
        self.reconnects += 1
        for index, client in enumerate(self.clients):
            self.known[index] = self.row[1]  # it reads again: what was missed is known now
            self._feed(index, client.talk.conv.listener_changed(True))

    @rule()
    def drain(self) -> None:
        for index, client in enumerate(self.clients):
            self._feed(index, client.talk.conv.drain_started())

    # ------------------------------------------------------------------ promises

    @invariant()
    def answers_are_never_owed_twice(self) -> None:
        for client in self.clients:
            assert all(count >= 0 for count in client.waiting.values())

    def teardown(self) -> None:
        """Everything in flight is answered (successfully) until nothing is left: every frame
        that waits for an answer has one."""
        if not self.clients:
            return
        for _ in range(10_000):
            waiting = [
                (index, client)
                for index, client in enumerate(self.clients)
                if client.loads or client.starts or client.replays or client.histories
            ]
            if self.switch_queue:
                self.commit_switch(True)
            elif self.switch_answers:
                self.answer_switch()
            elif self.turn_queue:
                self.answer_turn(True)
            elif waiting:
                index, client = waiting[0]
                if client.loads:
                    self._answer_load(index, as_asked=False)
                elif client.starts:
                    self._answer_reply(index, fails=False)
                elif client.replays:
                    self._answer_replay(index)
                else:
                    self._answer_history(index)
            elif any(self.inbox):
                self._notify(next(i for i, box in enumerate(self.inbox) if box))
            else:
                break
        for client in self.clients:
            if not client.closed:
                owed = {ref: n for ref, n in client.waiting.items() if n}
                assert not owed, ("frames never answered", owed)
                assert client.talk.conv.idle


TwoConversations.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_two_conversations_keep_the_protocols_promises = TwoConversations.TestCase
