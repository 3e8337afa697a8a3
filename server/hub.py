"""The sessions of this process, by user: where persona changes reach a user's other tabs."""

from __future__ import annotations

from typing import Protocol


class Listener(Protocol):
    """What the hub needs of a session (server/session.py): it passes both on to its
    conversation."""

    def on_persona_changed(self, personality: str, previous: str, version: int) -> None: ...

    def on_listener_changed(self, up: bool) -> None: ...


class Hub:
    """Maps user ids to their open sessions in this process.

    A user's sessions are a tuple (one, most often; at most `max_connections_per_user`): a set
    for each of tens of thousands of idle users would cost four times as much.
    """

    def __init__(self) -> None:
        self._by_user: dict[str, tuple[Listener, ...]] = {}

    def join(self, user_id: str, session: Listener) -> int:
        """Add a session; return how many this user now has here."""
        sessions = self._by_user.get(user_id, ())
        if session not in sessions:
            sessions = self._by_user[user_id] = (*sessions, session)
        return len(sessions)

    def leave(self, user_id: str, session: Listener) -> None:
        sessions = self._by_user.get(user_id)
        if sessions is None or session not in sessions:
            return
        others = tuple(s for s in sessions if s is not session)
        if others:
            self._by_user[user_id] = others
        else:
            del self._by_user[user_id]

    def count(self, user_id: str) -> int:
        return len(self._by_user.get(user_id, ()))

    def persona_changed(
        self,
        user_id: str,
        personality: str,
        previous: str,
        version: int,
        origin: Listener | None = None,
    ) -> int:
        """Tell every session of the user except `origin`; return how many were told."""
        told = 0
        for session in self._by_user.get(user_id, ()):
            if session is not origin:
                session.on_persona_changed(personality, previous, version)
                told += 1
        return told

    def listener_changed(self, up: bool) -> None:
        """Notifications stopped (sessions then read the avatar every time), or came back (some
        may have been missed: every session reads its avatar again)."""
        for sessions in tuple(self._by_user.values()):
            for session in sessions:
                session.on_listener_changed(up)
