"""Load shedding: the event loop's lag in, whether new chats are refused out (with hysteresis),
and a chat refused `overloaded` while a reply in flight is answered. No event loop, no socket."""

from __future__ import annotations

from protocol.conversation.actions import CommitTurn, LoadAvatar, StartReply
from protocol.conversation.core import Conversation
from protocol.conversation.load import Load
from protocol.frames import Usage
from tests.protocol.conversation.harness import Talk, avatar, frames, one, stored, terms

LAG = 0.2
CALM = 1.0


def fed(load: Load, lags: list[float], start: float = 0.0, every: float = 0.1) -> list[bool]:
    """Feed one sample per `every` seconds; whether the load sheds after each."""
    decisions = []
    for index, lag in enumerate(lags):
        now = start + index * every
        load.sample(lag, now, now + every)
        decisions.append(load.shedding)
    return decisions


def test_one_late_sample_does_not_shed_but_two_in_a_row_do() -> None:
    load = Load(LAG, CALM)
    assert fed(load, [0.01, 0.5, 0.01, 0.25, 0.2]) == [False, False, False, False, True]


def test_shedding_stops_only_after_the_lag_stayed_under_half_for_the_calm_period() -> None:
    load = Load(LAG, CALM)
    fed(load, [0.3, 0.3])
    # under the threshold but over half of it: still shedding, however long it lasts
    assert fed(load, [0.15] * 30, start=1.0) == [True] * 30
    # under half: calm from the first such sample, shedding stops once CALM has passed
    decisions = fed(load, [0.05] * 12, start=10.0)
    assert decisions == [True] * 10 + [False] * 2


def test_a_late_sample_during_the_calm_period_starts_it_again() -> None:
    load = Load(LAG, CALM)
    fed(load, [0.3, 0.3])
    assert fed(load, [0.05] * 8 + [0.12] + [0.05] * 10, start=1.0) == [True] * 19
    assert load.shedding and fed(load, [0.05], start=3.0) == [False]


def test_a_zero_threshold_never_sheds() -> None:
    load = Load(0.0, CALM)
    assert fed(load, [5.0] * 10) == [False] * 10
    assert not load.overloaded(100.0)


def test_a_blocked_loop_is_overloaded_before_its_monitor_samples_again() -> None:
    load = Load(LAG, CALM)
    load.sample(0.0, 10.0, 10.1)
    assert not load.overloaded(10.2)  # 0.1 s late: under the threshold
    assert load.overloaded(10.35)  # the sample due at 10.1 has not run for 0.25 s
    assert load.lag_at(10.35) == 10.35 - 10.1
    assert not load.shedding  # a timeout is explained; chats are shed only on samples


def test_the_retry_hint_is_the_calm_period() -> None:
    assert Load(LAG, 1.5).retry_after_ms == 1500


def _talk(load: Load, **changes: object) -> Talk:
    talk = Talk()
    talk.conv = Conversation(
        terms(**changes), talk.counts, talk.claims, talk.budgets, talk.now, load=load
    )
    talk.open(avatar("witty"))
    return talk


def test_a_new_chat_is_refused_overloaded_while_a_reply_in_flight_completes() -> None:
    load = Load(LAG, CALM)
    talk = _talk(load, streams=True)
    talk.frame(type="chat", id="c1", text="tell me a story")
    lookup = talk.conv.replay_missing(1)
    start = one(lookup, StartReply)
    talk.conv.reply_started(start.key, 20, 21)
    fed(load, [0.3, 0.3])

    refused = talk.frame(type="chat", id="c2", text="and another")
    assert frames(refused) == [
        {
            "type": "error",
            "ref": "c2",
            "code": "overloaded",
            "status": 503,
            "message": "the server is overloaded; try again after the delay in retry_after_ms",
            "details": {"retry_after_ms": 1000},
        }
    ]
    assert len(refused) == 1  # nothing read, queued or written for it
    assert load.refused == 1 and talk.counts.seen["error:overloaded"] == 1

    # the reply in flight streams on and is committed, then sent
    assert frames(talk.conv.reply_delta(start.key, "Once"))[0]["delta"] == "Once"
    usage = Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    commit = one(talk.conv.reply_ended(start.key, "Once upon", "completed", usage), CommitTurn)
    reply = frames(talk.conv.turn_committed(commit.key, stored(20), talk.now))[0]
    assert (reply["type"], reply["ref"], reply["text"]) == ("reply", "c1", "Once upon")


def test_chats_are_taken_again_once_shedding_stops() -> None:
    load = Load(LAG, CALM)
    talk = _talk(load)
    fed(load, [0.3, 0.3])
    assert frames(talk.frame(type="chat", id="c1", text="hi"))[0]["code"] == "overloaded"
    fed(load, [0.0] * 12, start=5.0)
    one(talk.frame(type="chat", id="c2", text="hi"), StartReply)


def test_a_chat_held_for_its_avatar_is_refused_if_shedding_started_meanwhile() -> None:
    load = Load(LAG, CALM)
    talk = Talk()
    talk.conv = Conversation(terms(), talk.counts, talk.claims, talk.budgets, talk.now, load=load)
    talk.open(None)
    one(talk.frame(type="chat", id="c1", text="hi"), LoadAvatar)
    fed(load, [0.3, 0.3])
    assert frames(talk.conv.avatar_loaded(avatar("witty")))[0]["code"] == "overloaded"


def test_a_draining_process_says_unavailable_even_while_it_sheds() -> None:
    load = Load(LAG, CALM)
    talk = _talk(load)
    fed(load, [0.3, 0.3])
    talk.conv.drain_started()
    refused = frames(talk.frame(type="chat", id="c1", text="hi"))[0]
    assert (refused["code"], refused["status"]) == ("unavailable", 503)
    assert load.refused == 0


def test_commands_and_switches_are_not_shed() -> None:
    load = Load(LAG, CALM)
    talk = _talk(load)
    fed(load, [0.3, 0.3])
    assert frames(talk.frame(type="chat", id="h", text="/help"))[0]["type"] == "notice"
    assert frames(talk.frame(type="ping", id="p"))[0]["type"] == "pong"


def test_a_timeout_within_the_window_after_a_lag_is_still_explained_by_it() -> None:
    load = Load(LAG, CALM, window_s=5.0)
    fed(load, [0.3, 0.3])  # lagging at 0.0 and 0.1: shedding from 0.1
    fed(load, [0.0] * 62, start=1.0)  # the sample at 2.0 ends the shedding; calm until 7.1
    assert not load.shedding
    assert load.overloaded(5.0)  # a call that timed out now was waiting while the loop lagged
    assert not load.overloaded(5.2)
    assert not Load(LAG, CALM).overloaded(0.0)  # no sample yet: nothing explained


def test_shedding_a_strained_database_started_explains_no_timeout_by_itself() -> None:
    """A database that stops answering: the one call that saw others answered sheds, and the
    timeouts after it, with a loop that never lagged, are an outage."""
    load = Load(LAG, CALM, window_s=5.0)
    fed(load, [0.0] * 10)
    assert load.strained(1.0) and load.shedding
    fed(load, [0.0] * 5, start=1.0)
    assert load.shedding and not load.overloaded(1.5)


def test_a_strained_database_sheds_at_once_and_calms_down_as_after_a_lag() -> None:
    load = Load(LAG, CALM)
    assert load.strained(1.0) and load.shedding
    assert not load.strained(1.1)  # already shedding
    assert fed(load, [0.0] * 12, start=1.2) == [True] * 10 + [False] * 2
    assert not Load(0.0, CALM).strained(1.0)  # a zero threshold never sheds
