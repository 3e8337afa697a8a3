"""The hub's map of users to sessions, without a socket: who is told of a persona change."""

from __future__ import annotations

from server.hub import Hub


class Tab:
    """A session as the hub sees it: it records what it is told."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, str, int]] = []
        self.listener: list[bool] = []

    def on_persona_changed(self, personality: str, previous: str, version: int) -> None:
        self.changes.append((personality, previous, version))

    def on_listener_changed(self, up: bool) -> None:
        self.listener.append(up)


def test_join_counts_a_users_sessions_once_each() -> None:
    hub, first, second = Hub(), Tab(), Tab()
    assert hub.join("ann", first) == 1
    assert hub.join("ann", second) == 2
    assert hub.join("ann", first) == 2
    assert hub.count("ann") == 2
    assert hub.count("bob") == 0


def test_persona_changed_tells_the_users_other_sessions_only() -> None:
    hub, origin, other, stranger = Hub(), Tab(), Tab(), Tab()
    hub.join("ann", origin)
    hub.join("ann", other)
    hub.join("bob", stranger)
    assert hub.persona_changed("ann", "witty", "friendly", 3, origin) == 1
    assert other.changes == [("witty", "friendly", 3)]
    assert origin.changes == []
    assert stranger.changes == []


def test_a_session_that_left_is_not_told() -> None:
    hub, staying, leaving = Hub(), Tab(), Tab()
    hub.join("ann", staying)
    hub.join("ann", leaving)
    hub.leave("ann", leaving)
    hub.leave("ann", leaving)  # twice: nothing more happens
    assert hub.count("ann") == 1
    assert hub.persona_changed("ann", "caring", "witty", 4) == 1
    assert staying.changes == [("caring", "witty", 4)]
    assert leaving.changes == []


def test_the_last_session_to_leave_removes_the_user() -> None:
    hub, tab = Hub(), Tab()
    hub.join("ann", tab)
    hub.leave("ann", tab)
    hub.leave("bob", tab)  # a user the hub never had
    assert hub.count("ann") == 0
    assert hub.persona_changed("ann", "witty", "friendly", 2) == 0


def test_a_session_that_leaves_while_told_does_not_stop_the_others_being_told() -> None:
    hub = Hub()
    tabs = [Tab(), Tab(), Tab()]

    class Leaving(Tab):
        def on_persona_changed(self, personality: str, previous: str, version: int) -> None:
            super().on_persona_changed(personality, previous, version)
            hub.leave("ann", self)

    leaving = Leaving()
    hub.join("ann", leaving)
    for tab in tabs:
        hub.join("ann", tab)
    assert hub.persona_changed("ann", "witty", "friendly", 5) == 4
    assert all(tab.changes == [("witty", "friendly", 5)] for tab in tabs)
    assert hub.count("ann") == 3


def test_listener_changed_reaches_every_session_of_every_user() -> None:
    hub, ann, bob = Hub(), Tab(), Tab()
    hub.join("ann", ann)
    hub.join("bob", bob)
    hub.listener_changed(False)
    hub.listener_changed(True)
    assert ann.listener == [False, True]
    assert bob.listener == [False, True]
