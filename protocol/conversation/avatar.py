"""One conversation's view of its user's avatar: the cached row, the switches it has in flight,
and the newest versions it has seen and told its client about."""

from __future__ import annotations

from dataclasses import dataclass

from protocol.conversation.records import Avatar
from protocol.errors import NoAvatar, ProtocolError, Unavailable

MAX_SWITCHES_IN_FLIGHT = 4  # a session's switches not yet answered; the next one waits
MAX_AVATAR_READS = 5  # reads of the avatar for one frame while newer changes keep being notified


@dataclass(slots=True, eq=False)
class PendingSwitch:
    """A persona switch handed to the store. Chats read behind it are rendered with its
    personality, and written only once it has committed."""

    key: int
    personality: str
    ref: str | None
    epoch: int  # the cache's epoch right after this switch emptied it
    answered: bool = False
    failure: ProtocolError | None = None  # why it did not commit, once answered

    def chat_failure(self) -> ProtocolError | None:
        """Why a chat rendered after this answered switch is not written; None if it committed."""
        if self.failure is None:
            return None
        if isinstance(self.failure, NoAvatar):
            return NoAvatar()
        return Unavailable("the persona switch before this chat did not commit")


class AvatarView:
    """The avatar as one conversation knows it.

    A chat is never rendered with an older persona than the client knows, and an older persona
    is never pushed: `seen` is the newest version this conversation has seen (read, committed
    or notified), `told` the newest its client was told about.
    """

    __slots__ = (
        "_contested",
        "cached",
        "epoch",
        "in_flight",
        "name",
        "newest",
        "seen",
        "told",
        "told_persona",
        "trusted",
        "welcomed",
    )

    def __init__(self, trusted: bool) -> None:
        self.cached: Avatar | None = None
        self.name = ""  # the avatar's name, as last seen ({{char}} in a card)
        self.epoch = 0  # bumped whenever the cache is emptied
        self.seen = 0
        self.told = 0
        self.told_persona = ""
        self.welcomed = False  # pushes wait for `welcome`, which carries the avatar
        self.trusted = trusted  # False while notifications may be missed: every read reloads
        self.in_flight = 0  # switches handed to the store and not answered
        self.newest: PendingSwitch | None = None
        self._contested = False

    # ------------------------------------------------------------------ the cache

    def clear(self) -> None:
        self.cached = None
        self.epoch += 1

    def usable(self) -> Avatar | None:
        """The cached row, when it may be rendered from without a read."""
        return self.cached if self.trusted else None

    def saw(self, avatar: Avatar) -> None:
        self.seen = max(self.seen, avatar.version)
        self.name = avatar.name

    def tell(self, version: int, personality: str) -> None:
        """The client now knows this personality, at this version."""
        if version > self.told:
            self.told = version
            self.told_persona = personality

    def went_back(self, avatar: Avatar) -> None:
        """The row is older than before the read with nothing notified meanwhile: it went back
        (a restored database). Believe it, and make sure the client is told."""
        self.seen = avatar.version
        self.told = min(self.told, avatar.version - 1)

    # ------------------------------------------------------------------ switches

    @property
    def full(self) -> bool:
        return self.in_flight >= MAX_SWITCHES_IN_FLIGHT

    def deciding(self) -> PendingSwitch | None:
        """The switch whose personality the next chat takes, if one does: the newest in flight,
        unless another connection's change was notified meanwhile (which of the two commits
        last is not known until ours is answered; then chats wait and read)."""
        return None if self._contested else self.newest

    def started(self, switch: PendingSwitch) -> None:
        self.newest = switch
        self.in_flight += 1

    def answered(self, switch: PendingSwitch) -> None:
        switch.answered = True
        self.in_flight -= 1
        if self.newest is switch:
            self.newest = None
        if not self.in_flight:
            self._contested = False

    def missed(self) -> None:
        """Changes may have been missed (the listener was down): the cache is emptied, and a
        switch in flight no longer decides (a missed change may be newer)."""
        self.clear()
        self._contested = self.in_flight > 0

    def notified(self, version: int) -> bool:
        """A change made elsewhere; True when it is newer than anything seen (the cache is then
        emptied, and a switch in flight no longer decides)."""
        if version <= self.seen:
            return False
        self.seen = version
        self.clear()
        self._contested = self.in_flight > 0
        return True
