"""The conversation's frame rules, `hello`, the avatar and persona switches: inputs in, actions
out, as websockets tests its `Protocol`."""

from __future__ import annotations

from protocol.conversation.actions import (
    Authenticate,
    Close,
    CommitSwitch,
    CreateAvatar,
    LoadAvatar,
    Publish,
    ReadHistory,
    StartReply,
)
from protocol.conversation.base import Phase
from protocol.conversation.limits import UserBudgets
from protocol.errors import AvatarExists, Unavailable
from protocol.frames import HistoryEntry
from tests.protocol.conversation.harness import (
    USER,
    Talk,
    avatar,
    frames,
    kinds,
    one,
    switched,
)

# ---------------------------------------------------------------------------- hello


def test_hello_asks_for_authentication_and_holds_the_frames_behind_it() -> None:
    talk = Talk()
    assert one(talk.frame(type="hello", id="h", token="tok"), Authenticate).token == "tok"
    assert talk.frame(type="ping", id="p") == []  # read before `welcome`: it waits
    assert not talk.conv.wants_frames
    out = talk.conv.authenticated(USER, avatar("witty"), ())
    welcome, pong = frames(out)
    assert (welcome["type"], welcome["ref"], welcome["avatar"]["personality"]) == (
        "welcome", "h", "witty",
    )  # fmt: skip
    assert (pong["type"], pong["ref"]) == ("pong", "p")
    assert talk.conv.phase is Phase.OPEN and talk.conv.wants_frames


def test_a_first_frame_that_is_not_hello_closes_4401() -> None:
    talk = Talk()
    close = one(talk.frame(type="ping", id="p"), Close)
    assert (close.code, close.reason) == (4401, "send hello first")
    assert talk.conv.phase is Phase.CLOSED
    assert talk.frame(type="hello", token="x") == []


def test_an_invalid_hello_says_what_is_wrong() -> None:
    close = one(Talk().frame(type="hello", token="x" * 9000), Close)
    assert close.code == 4401
    assert close.reason.startswith("invalid hello: token: String should have at most 8192")
    assert len(close.reason.encode()) <= 123


def test_a_refused_hello_closes_with_its_code() -> None:
    talk = Talk()
    talk.frame(type="hello", token="x")
    close = one(talk.conv.refused(4429, "too many connections"), Close)  # type: ignore[arg-type]
    assert (close.code, close.reason) == (4429, "too many connections")


def test_a_change_notified_while_the_user_opens_is_read_again_before_welcome() -> None:
    talk = Talk()
    talk.frame(type="hello", token="x")
    talk.conv.persona_notified("witty", "friendly", 2)
    out = talk.conv.authenticated(USER, avatar("friendly", 1), ())
    assert kinds(out) == ["LoadAvatar"]  # no welcome with the row read before the change
    welcome = frames(talk.conv.avatar_loaded(avatar("witty", 2)))[0]
    assert welcome["avatar"]["personality"] == "witty"


# ---------------------------------------------------------------------------- frames


def test_garbage_is_answered_and_the_conversation_goes_on() -> None:
    talk = Talk()
    talk.open(avatar())
    assert frames(talk.raw("not json"))[0]["code"] == "bad_json"
    assert frames(talk.raw(b"\x00"))[0]["code"] == "bad_json"  # type: ignore[arg-type]
    error = frames(talk.raw('{"type": "chat", "id": "k1", "text": 5}'))[0]
    assert (error["code"], error["ref"]) == ("invalid_frame", "k1")
    assert frames(talk.frame(type="ping", id="p"))[0]["type"] == "pong"
    assert talk.counts.seen["frame:invalid"] == 3


def test_a_second_hello_is_an_invalid_frame() -> None:
    talk = Talk()
    talk.open(avatar())
    error = frames(talk.frame(type="hello", id="h2", token="x"))[0]
    assert (error["code"], error["message"], error["ref"]) == (
        "invalid_frame", "already authenticated", "h2",
    )  # fmt: skip


def test_frames_past_the_rate_are_limited_and_a_flood_is_closed() -> None:
    talk = Talk(abuse_close_after=3)
    talk.open(avatar())
    talk.now += 100  # a full bucket of 40
    answers = [frames(talk.conv.receive_text('{"type":"ping"}', talk.now)) for _ in range(42)]
    assert [a[0]["type"] for a in answers[:40]] == ["pong"] * 40
    assert [a[0]["code"] for a in answers[40:]] == ["rate_limited"] * 2
    out = talk.conv.receive_text('{"type":"ping","id":"x"}', talk.now)
    assert kinds(out) == ["Send:error", "Close"]
    assert one(out, Close).code == 1008
    assert talk.conv.receive_text('{"type":"ping"}', talk.now) == []


def test_commands_answer_in_the_conversation() -> None:
    talk = Talk()
    talk.open(avatar())
    assert frames(talk.frame(type="chat", id="c", text="/help"))[0]["type"] == "notice"
    listed = frames(talk.frame(type="chat", id="c", text="/personas"))[0]
    assert [p["id"] for p in listed["personas"]][:2] == ["friendly", "playful"]
    unknown = frames(talk.frame(type="chat", id="u", text="/dance"))[0]
    assert (unknown["code"], unknown["ref"]) == ("unknown_command", "u")
    invalid = frames(talk.frame(type="chat", id="v", text="/persona grumpy"))[0]
    assert invalid["code"] == "invalid_persona" and "witty" in invalid["details"]["allowed"]


def test_history_is_read_then_paid_for_from_the_users_budget() -> None:
    budgets = UserBudgets(rate=1000, burst=2000)
    talk = Talk(budgets=budgets)
    talk.open(avatar())
    read = one(talk.frame(type="history", id="h1", limit=5), ReadHistory)
    assert (read.limit, read.before) == (5, None)
    assert talk.frame(type="ping", id="p") == []  # behind the history page
    entry = HistoryEntry(
        id=1, role="user", persona="friendly", text="x" * 5000, created_at=avatar().created_at
    )
    page, pong = frames(talk.conv.history_read([entry], talk.now))
    assert (page["type"], page["ref"], pong["type"]) == ("history", "h1", "pong")
    limited = frames(talk.frame(type="history", id="h2"))[0]
    assert (limited["code"], limited["ref"]) == ("rate_limited", "h2")
    assert limited["details"]["retry_after_ms"] > 3000


# ---------------------------------------------------------------------------- the avatar


def test_get_avatar_answers_from_the_cache() -> None:
    talk = Talk()
    talk.open(avatar("caring"))
    answer = frames(talk.frame(type="get_avatar", id="g"))[0]
    assert (answer["type"], answer["avatar"]["personality"]) == ("avatar", "caring")


def test_without_an_avatar_it_is_read_and_its_absence_is_not_cached() -> None:
    talk = Talk()
    talk.open(None)
    assert kinds(talk.frame(type="get_avatar", id="g")) == ["LoadAvatar"]
    assert frames(talk.conv.avatar_loaded(None))[0]["code"] == "no_avatar"
    assert kinds(talk.frame(type="chat", id="c", text="hi")) == ["LoadAvatar"]  # read again
    error = frames(talk.conv.avatar_loaded(None))[0]
    assert (error["ref"], error["code"], error["status"]) == ("c", "no_avatar", 404)


def test_an_avatar_is_created_behind_the_switches_in_flight() -> None:
    talk = Talk()
    talk.open(None)
    switch = one(talk.frame(type="set_persona", id="s", personality="witty"), CommitSwitch)
    assert talk.frame(type="create_avatar", id="a", name="Ava", personality="caring") == []
    out = talk.conv.switch_committed(switch.key, None)  # no avatar to switch yet
    assert kinds(out) == ["Send:error", "CreateAvatar"]
    assert one(out, CreateAvatar).personality == "caring"
    created = frames(talk.conv.avatar_created(avatar("caring")))[0]
    assert (created["type"], created["ref"]) == ("avatar", "a")
    assert one(talk.frame(type="chat", text="hi"), StartReply).persona == "caring"


def test_an_avatar_that_exists_already_is_refused() -> None:
    talk = Talk()
    talk.open(avatar())
    talk.frame(type="create_avatar", id="a", name="Ava", personality="caring")
    error = frames(talk.conv.avatar_failed(AvatarExists()))[0]
    assert (error["code"], error["ref"]) == ("avatar_exists", "a")


def test_an_avatar_created_while_a_switch_is_notified_is_not_cached_over_it() -> None:
    """Right after this connection creates the avatar, another process switches it, and the
    notification arrives before the create's answer: the next chat has the switched persona."""
    talk = Talk()
    talk.open(None)
    talk.frame(type="create_avatar", id="a", name="Ava", personality="friendly")
    talk.conv.persona_notified("witty", "friendly", 2)
    talk.conv.avatar_created(avatar("friendly", 1))
    assert kinds(talk.frame(type="chat", id="c", text="which now?")) == ["LoadAvatar"]
    assert one(talk.conv.avatar_loaded(avatar("witty", 2)), StartReply).persona == "witty"


def test_a_change_notified_while_the_avatar_is_read_is_not_rendered_over() -> None:
    """The chat reads the avatar; before the read's answer is used, another process commits a
    switch and its notification arrives (pushed to the client). The row is now older than what
    the client was told: the chat reads again."""
    talk = Talk()
    talk.open(avatar("friendly", 1))
    talk.conv.listener_changed(False)
    talk.conv.listener_changed(True)  # every cache emptied
    assert kinds(talk.frame(type="chat", id="c", text="which now?")) == ["LoadAvatar"]
    pushed = frames(talk.conv.persona_notified("witty", "friendly", 2))[0]
    assert (pushed["type"], pushed["personality"]) == ("persona_changed", "witty")
    assert kinds(talk.conv.avatar_loaded(avatar("friendly", 1))) == ["LoadAvatar"]
    assert one(talk.conv.avatar_loaded(avatar("witty", 2)), StartReply).persona == "witty"


def test_a_read_that_keeps_meeting_newer_changes_gives_up_unavailable() -> None:
    talk = Talk(trusted=False)
    talk.open(avatar("friendly", 1))
    talk.frame(type="chat", id="c", text="hi")
    for version in range(2, 6):
        talk.conv.persona_notified("witty", "friendly", version)
        assert kinds(talk.conv.avatar_loaded(avatar("friendly", 1))) == ["LoadAvatar"]
    talk.conv.persona_notified("caring", "witty", 6)
    error = frames(talk.conv.avatar_loaded(avatar("friendly", 1)))[0]
    assert (error["code"], error["ref"]) == ("unavailable", "c")


def test_an_avatar_whose_version_went_back_is_believed_and_pushed() -> None:
    """The row's version goes back (a restored database) with nothing notified: chats are
    answered with the avatar as it is, and the client is told first."""
    talk = Talk(trusted=False)
    talk.open(avatar("playful", 4))
    talk.frame(type="chat", id="c", text="still there?")
    out = talk.conv.avatar_loaded(avatar("romantic", 1))
    assert kinds(out) == ["Send:persona_changed", "StartReply"]
    assert frames(out)[0] == {
        "type": "persona_changed", "personality": "romantic", "previous": "playful",
    }  # fmt: skip


def test_a_late_or_repeated_notification_is_neither_pushed_nor_clears_the_cache() -> None:
    talk = Talk()
    talk.open(avatar("friendly", 3))
    assert talk.conv.persona_notified("witty", "caring", 2) == []
    assert talk.conv.persona_notified("friendly", "witty", 3) == []
    assert one(talk.frame(type="chat", text="hi"), StartReply).persona == "friendly"


def test_without_notifications_every_chat_reads_and_their_return_empties_the_cache() -> None:
    talk = Talk()
    talk.open(avatar("friendly", 1))
    talk.conv.listener_changed(False)
    assert kinds(talk.frame(type="get_avatar")) == ["LoadAvatar"]
    talk.conv.avatar_loaded(avatar("friendly", 1))
    assert kinds(talk.frame(type="get_avatar")) == ["LoadAvatar"]
    talk.conv.avatar_loaded(avatar("friendly", 1))
    talk.conv.listener_changed(True)
    assert kinds(talk.frame(type="get_avatar")) == ["LoadAvatar"]  # changes may have been missed
    talk.conv.avatar_loaded(avatar("friendly", 1))
    assert kinds(talk.frame(type="get_avatar")) == ["Send:avatar"]


# ---------------------------------------------------------------------------- switches


def test_a_switch_is_acknowledged_published_and_cached_once_committed() -> None:
    talk = Talk()
    talk.open(avatar("friendly", 1))
    switch = one(talk.frame(type="set_persona", id="s", personality="witty"), CommitSwitch)
    out = talk.conv.switch_committed(switch.key, switched("witty", "friendly", 2))
    ack = frames(out)[0]
    assert (ack["type"], ack["ref"], ack["personality"], ack["previous"]) == (
        "persona_set", "s", "witty", "friendly",
    )  # fmt: skip
    assert one(out, Publish) == Publish("witty", "friendly", 2)
    # the chat after it renders from the committed row: no read
    assert kinds(talk.frame(type="chat", text="hi"))[-1] == "StartReply"
    assert talk.counts.seen["switch"] == 1


def test_a_chat_pipelined_behind_a_switch_takes_its_persona_and_waits_for_its_answer() -> None:
    talk = Talk()
    talk.open(avatar("friendly", 1))
    switch = one(talk.frame(type="chat", id="s", text="/persona romantic"), CommitSwitch)
    assert kinds(talk.frame(type="chat", id="c", text="hi")) == []  # waits for the switch
    out = talk.conv.switch_committed(switch.key, switched("romantic", "friendly", 2))
    assert kinds(out) == ["Send:persona_set", "Publish", "StartReply"]  # ack first
    assert one(out, StartReply).persona == "romantic"


def test_a_chat_behind_a_failed_switch_fails_with_it() -> None:
    talk = Talk()
    talk.open(avatar("friendly", 1))
    switch = one(talk.frame(type="set_persona", id="s", personality="witty"), CommitSwitch)
    talk.frame(type="chat", id="c", text="hi")
    out = talk.conv.switch_failed(switch.key, Unavailable())
    assert [(f["ref"], f["code"]) for f in frames(out)] == [
        ("s", "unavailable"),
        ("c", "unavailable"),
    ]
    assert "StartReply" not in kinds(out)
    assert kinds(talk.frame(type="chat", id="d", text="again")) == ["LoadAvatar"]


def test_a_chat_behind_a_switch_without_avatar_is_no_avatar_too() -> None:
    talk = Talk()
    talk.open(None)
    switch = one(talk.frame(type="set_persona", id="s", personality="witty"), CommitSwitch)
    talk.frame(type="chat", id="c", text="hi")
    out = talk.conv.switch_committed(switch.key, None)
    assert [(f["ref"], f["code"]) for f in frames(out)] == [("s", "no_avatar"), ("c", "no_avatar")]


def test_a_chat_read_after_another_connections_change_waits_for_the_switch_in_flight() -> None:
    """This connection's switch commits, then another process's does and is notified before
    this switch is answered: a chat read meanwhile must not take this switch's persona, which is
    no longer the avatar's. It waits for the answer, then reads the avatar."""
    talk = Talk()
    talk.open(avatar("friendly", 1))
    switch = one(talk.frame(type="set_persona", id="s", personality="romantic"), CommitSwitch)
    pushed = frames(talk.conv.persona_notified("witty", "romantic", 3))[0]
    assert pushed["personality"] == "witty"
    assert talk.frame(type="chat", id="c", text="which now?") == []
    out = talk.conv.switch_committed(switch.key, switched("romantic", "friendly", 2))
    assert kinds(out) == ["Send:persona_set", "Publish", "LoadAvatar"]
    assert one(talk.conv.avatar_loaded(avatar("witty", 3)), StartReply).persona == "witty"


def test_a_switch_answered_after_a_listener_reconnect_does_not_refill_the_cache() -> None:
    """The listener drops and comes back (a switch of another process may have been missed)
    while this session's switch commits: the next chat reads, it does not reuse the row."""
    talk = Talk()
    talk.open(avatar("friendly", 1))
    switch = one(talk.frame(type="set_persona", id="s", personality="romantic"), CommitSwitch)
    talk.conv.listener_changed(False)
    talk.conv.listener_changed(True)
    talk.conv.switch_committed(switch.key, switched("romantic", "friendly", 2))
    assert kinds(talk.frame(type="chat", id="c", text="which now?")) == ["LoadAvatar"]
    assert one(talk.conv.avatar_loaded(avatar("witty", 3)), StartReply).persona == "witty"


def test_a_switch_not_the_newest_of_its_batch_leaves_the_cache_empty() -> None:
    talk = Talk()
    talk.open(avatar("friendly", 1))
    switch = one(talk.frame(type="set_persona", personality="romantic"), CommitSwitch)
    talk.conv.switch_committed(switch.key, switched("romantic", "friendly", 2, newest=False))
    assert kinds(talk.frame(type="get_avatar")) == ["LoadAvatar"]


def test_a_fifth_switch_in_flight_waits_for_the_four_before_it() -> None:
    talk = Talk()
    talk.open(avatar("friendly", 1))
    keys = [
        one(talk.frame(type="set_persona", personality=p), CommitSwitch).key
        for p in ("witty", "caring", "playful", "romantic")
    ]
    assert talk.frame(type="set_persona", id="5", personality="witty") == []
    assert not talk.conv.wants_frames
    for key in keys[:3]:
        assert "CommitSwitch" not in kinds(talk.conv.switch_committed(key, None))
    out = talk.conv.switch_committed(keys[3], switched("romantic", "playful", 5))
    assert kinds(out)[-1] == "CommitSwitch" and talk.conv.wants_frames


def test_a_notification_is_pushed_only_after_welcome() -> None:
    talk = Talk()
    talk.frame(type="hello", token="x")
    assert talk.conv.persona_notified("witty", "friendly", 2) == []
    talk.conv.authenticated(USER, avatar("friendly", 1), ())  # read again: it changed
    welcome = frames(talk.conv.avatar_loaded(avatar("witty", 2)))[0]
    assert welcome["avatar"]["personality"] == "witty"
    assert frames(talk.conv.persona_notified("caring", "witty", 3))[0]["type"] == "persona_changed"


def test_a_switch_is_validated_before_anything_is_committed() -> None:
    talk = Talk()
    talk.open(avatar())
    assert kinds(talk.frame(type="set_persona", id="s", personality="grumpy")) == ["Send:error"]
    assert kinds(talk.frame(type="chat", text="/persona")) == ["Send:error"]
    assert isinstance(talk.frame(type="chat", text="hi")[-1], StartReply)
    assert not [a for a in talk.frame(type="get_avatar") if isinstance(a, LoadAvatar)]


def test_after_a_listener_reconnect_a_switch_in_flight_no_longer_decides() -> None:
    """A change missed while the listener was down may be newer than this session's switch in
    flight (found by the stateful test): a chat read meanwhile waits for the switch, then reads."""
    talk = Talk()
    talk.open(avatar("friendly", 1))
    switch = one(talk.frame(type="set_persona", id="s", personality="romantic"), CommitSwitch)
    talk.conv.listener_changed(False)
    talk.conv.listener_changed(True)
    assert talk.frame(type="chat", id="c", text="which now?") == []
    out = talk.conv.switch_committed(switch.key, switched("romantic", "friendly", 2))
    assert kinds(out)[-1] == "LoadAvatar"
    assert one(talk.conv.avatar_loaded(avatar("witty", 3)), StartReply).persona == "witty"
