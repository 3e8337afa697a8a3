"""The chat rules: one reply at a time and in order, committed before it is sent; the queue and
`busy`; cancel; retried ids; drain and a lost connection."""

from __future__ import annotations

from protocol.conversation.actions import (
    CancelReply,
    CommitTurn,
    Replay,
    StartReply,
)
from protocol.conversation.base import Phase
from protocol.conversation.chats import Claims
from protocol.conversation.records import PastMessage, PastTurn
from protocol.errors import Unavailable
from protocol.frames import Usage
from tests.protocol.conversation.harness import (
    Talk,
    avatar,
    frames,
    kinds,
    one,
    stored,
)


def opened(**changes: object) -> Talk:
    talk = Talk(**changes)  # type: ignore[arg-type]
    talk.open(avatar("witty"))
    return talk


def test_a_reply_is_generated_committed_then_sent() -> None:
    talk = opened()
    start = one(talk.frame(type="chat", id="c", text="hello"), StartReply)
    assert (start.persona, start.text, start.recent) == ("witty", "hello", ())
    commit = one(talk.conv.reply_ended(start.key, "Hi!", "completed"), CommitTurn)
    turn = commit.turn
    assert (turn.user_text, turn.reply_text, turn.persona, turn.client_id) == (
        "hello", "Hi!", "witty", "c",
    )  # fmt: skip
    reply = frames(talk.conv.turn_committed(commit.key, stored(10), talk.now))[0]
    assert reply == {
        "type": "reply", "ref": "c", "reply_id": 11, "message_id": 10, "persona": "witty",
        "text": "Hi!", "status": "completed",
    }  # fmt: skip
    assert talk.conv.idle and talk.counts.seen["reply:completed"] == 1


def test_a_nul_in_a_generated_reply_is_committed_and_sent_as_a_replacement_character() -> None:
    talk = opened()
    start = one(talk.frame(type="chat", id="c", text="hello"), StartReply)
    commit = one(talk.conv.reply_ended(start.key, "a\x00b", "completed"), CommitTurn)
    assert commit.turn.reply_text == "a\ufffdb"
    reply = frames(talk.conv.turn_committed(commit.key, stored(10), talk.now))[0]
    assert reply["text"] == "a\ufffdb"


def test_the_generator_gets_the_conversation_so_far() -> None:
    talk = opened()
    start = one(talk.frame(type="chat", text="my cat is Miso"), StartReply)
    commit = one(talk.conv.reply_ended(start.key, "Lovely.", "completed"), CommitTurn)
    talk.conv.turn_committed(commit.key, stored(), talk.now)
    second = one(talk.frame(type="chat", text="and you?"), StartReply)
    assert second.recent == (
        PastMessage("user", "my cat is Miso", "witty"),
        PastMessage("assistant", "Lovely.", "witty"),
    )  # fmt: skip


def test_chats_wait_in_order_and_the_ninth_waiting_is_busy() -> None:
    talk = opened()
    first = one(talk.frame(type="chat", id="c0", text="0"), StartReply)
    for index in range(1, 9):
        assert talk.frame(type="chat", id=f"c{index}", text=str(index)) == []
    busy = frames(talk.frame(type="chat", id="c9", text="9"))[0]
    assert (busy["code"], busy["ref"], busy["details"]) == ("busy", "c9", {"queued": 8})
    commit = one(talk.conv.reply_ended(first.key, "r0", "completed"), CommitTurn)
    out = talk.conv.turn_committed(commit.key, stored(), talk.now)
    assert kinds(out) == ["Send:reply", "StartReply"]
    assert one(out, StartReply).text == "1"


def test_a_chat_id_being_answered_in_the_process_is_busy() -> None:
    claims = Claims()
    first, second = opened(claims=claims), opened(claims=claims)
    one(first.frame(type="chat", id="same", text="hi"), StartReply)
    busy = frames(second.frame(type="chat", id="same", text="hi"))[0]
    assert busy["code"] == "busy" and "still being answered" in busy["message"]
    assert claims.holds("ann", "same")


def test_a_streamed_reply_sends_its_deltas_with_the_reply_id() -> None:
    talk = opened(streams=True)
    lookup = one(talk.frame(type="chat", id="c", text="tell me"), Replay)  # a retry? first
    start = one(talk.conv.replay_missing(lookup.key), StartReply)
    talk.conv.reply_started(start.key, 20, 21)
    delta = frames(talk.conv.reply_delta(start.key, "Once"))[0]
    assert delta == {"type": "reply_delta", "ref": "c", "reply_id": 21, "delta": "Once"}
    usage = Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    commit = one(talk.conv.reply_ended(start.key, "Once upon", "completed", usage), CommitTurn)
    assert (commit.turn.message_id, commit.turn.reply_id) == (20, 21)
    reply = frames(talk.conv.turn_committed(commit.key, stored(20), talk.now))[0]
    assert (reply["text"], reply["reply_id"], reply["usage"]["total_tokens"]) == (
        "Once upon", 21, 5,
    )  # fmt: skip


def test_a_failed_reply_is_stored_then_answered_with_its_failure() -> None:
    talk = opened()
    start = one(talk.frame(type="chat", id="c", text="hi"), StartReply)
    failure = Unavailable("cannot connect to the LLM endpoint")
    commit = one(talk.conv.reply_ended(start.key, "par", "failed", None, failure), CommitTurn)
    assert (commit.turn.status, commit.turn.reply_text) == ("failed", "par")
    assert commit.turn.error_code == "unavailable"
    error = frames(talk.conv.turn_committed(commit.key, stored(), talk.now))[0]
    assert (error["code"], error["ref"], error["message"]) == (
        "unavailable", "c", "cannot connect to the LLM endpoint",
    )  # fmt: skip


def test_a_commit_that_fails_is_answered_and_the_next_chat_goes_on() -> None:
    talk = opened()
    start = one(talk.frame(type="chat", id="c1", text="a"), StartReply)
    talk.frame(type="chat", id="c2", text="b")
    commit = one(talk.conv.reply_ended(start.key, "r", "completed"), CommitTurn)
    out = talk.conv.chat_failed(commit.key, Unavailable())
    assert kinds(out) == ["Send:error", "StartReply"]
    assert frames(out)[0]["ref"] == "c1"


# ---------------------------------------------------------------------------- cancel


def test_cancel_without_a_reply_in_flight_is_nothing_to_cancel() -> None:
    talk = opened()
    error = frames(talk.frame(type="cancel", id="x"))[0]
    assert (error["code"], error["ref"]) == ("nothing_to_cancel", "x")


def test_cancel_right_behind_its_chat_ends_it_cancelled_without_generating() -> None:
    talk = opened(streams=True)
    lookup = one(talk.frame(type="chat", id="c", text="story"), Replay)
    assert talk.frame(type="cancel", id="x") == []  # noted; nothing generates yet
    commit = one(talk.conv.replay_missing(lookup.key), CommitTurn)
    assert (commit.turn.status, commit.turn.reply_text) == ("cancelled", "")
    reply = frames(talk.conv.turn_committed(commit.key, stored(), talk.now))[0]
    assert (reply["status"], reply["ref"]) == ("cancelled", "c")


def test_cancel_while_generating_asks_the_shell_to_stop_once() -> None:
    talk = opened(streams=True)
    lookup = one(talk.frame(type="chat", id="c", text="story"), Replay)
    start = one(talk.conv.replay_missing(lookup.key), StartReply)
    assert one(talk.frame(type="cancel"), CancelReply).key == start.key
    assert frames(talk.frame(type="cancel", id="again"))[0]["code"] == "nothing_to_cancel"
    commit = one(talk.conv.reply_ended(start.key, "Once", "cancelled"), CommitTurn)
    assert frames(talk.frame(type="cancel", id="late"))[0]["code"] == "nothing_to_cancel"
    assert commit.turn.status == "cancelled"


# ---------------------------------------------------------------------------- retries


def test_a_retry_of_a_stored_chat_is_looked_up_not_generated() -> None:
    talk = Talk()
    talk.open(avatar("witty"), ids=["old-1"])
    lookup = one(talk.frame(type="chat", id="old-1", text="hi"), Replay)
    past = PastTurn(3, "hi", 4, "caring", "stored answer", "completed")
    reply = frames(talk.conv.replay_found(lookup.key, past))[0]
    assert (reply["replayed"], reply["persona"], reply["text"]) == (True, "caring", "stored answer")
    assert talk.counts.seen["reply:replayed"] == 1


def test_a_retry_with_another_text_is_duplicate_id() -> None:
    talk = Talk()
    talk.open(avatar("witty"), ids=["old-1"])
    lookup = one(talk.frame(type="chat", id="old-1", text="other"), Replay)
    error = frames(talk.conv.replay_found(lookup.key, PastTurn(3, "hi", 4, "w", "x", "completed")))
    assert (error[0]["code"], error[0]["details"]) == ("duplicate_id", {"message_id": 3})


def test_a_chat_stored_meanwhile_is_answered_from_storage() -> None:
    talk = opened()
    start = one(talk.frame(type="chat", id="c", text="hi"), StartReply)
    commit = one(talk.conv.reply_ended(start.key, "Hi", "completed"), CommitTurn)
    lookup = one(talk.conv.turn_committed(commit.key, stored(inserted=False), talk.now), Replay)
    assert lookup.client_id == "c"
    past = PastTurn(3, "hi", 4, "witty", "first answer", "completed")
    assert frames(talk.conv.replay_found(lookup.key, past))[0]["text"] == "first answer"
    assert one(talk.frame(type="chat", id="c", text="hi"), Replay)  # known to be stored now


# ---------------------------------------------------------------------------- drain and close


def test_a_draining_conversation_answers_queued_chats_and_refuses_new_ones() -> None:
    talk = opened()
    start = one(talk.frame(type="chat", id="c1", text="a"), StartReply)
    talk.frame(type="chat", id="c2", text="b")
    talk.conv.drain_started()
    refused = frames(talk.frame(type="chat", id="c3", text="c"))[0]
    assert (refused["code"], refused["ref"]) == ("unavailable", "c3")
    commit = one(talk.conv.reply_ended(start.key, "r", "completed"), CommitTurn)
    assert one(talk.conv.turn_committed(commit.key, stored(), talk.now), StartReply).text == "b"
    assert talk.conv.phase is Phase.DRAINING


def test_a_lost_connection_drops_waiting_chats_and_cancels_the_reply_in_flight() -> None:
    claims = Claims()
    talk = opened(claims=claims, streams=True)
    lookup = one(talk.frame(type="chat", id="c1", text="a"), Replay)
    start = one(talk.conv.replay_missing(lookup.key), StartReply)
    talk.frame(type="chat", id="c2", text="b")
    assert one(talk.conv.connection_lost(), CancelReply).key == start.key
    assert not claims.holds("ann", "c2")
    commit = one(talk.conv.reply_ended(start.key, "par", "cancelled"), CommitTurn)
    assert commit.turn.status == "interrupted"  # not the user's cancel
    assert talk.conv.turn_committed(commit.key, stored(), talk.now) == []  # nobody to tell
    assert talk.conv.idle and len(claims) == 0
