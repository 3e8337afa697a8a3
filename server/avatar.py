"""One session's view of its user's avatar: the cached row, its switches, what its client knows."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

from protocol.errors import NoAvatar, Unavailable
from protocol.frames import Avatar, CreateAvatar, PersonaChanged, PersonaSet, ServerFrame
from protocol.personas import require_known
from server.records import Avatar as StoredAvatar
from server.records import Switch, SwitchResult
from server.services import Services
from server.switches import SwitchesInFlight

log = logging.getLogger("server.session")

# Reads of the avatar for one chat while changes keep being notified under them; then it fails.
MAX_AVATAR_READS = 5

Emit = Callable[[ServerFrame | bytes], None]
EmitError = Callable[[Exception, str | None], None]


class AvatarState:
    """The avatar as one session knows it.

    It caches the row, hands the session's persona switches to the group commit, and keeps
    track of the newest version seen and the newest one its client was told about, so that a
    chat is never rendered with an older persona than the client knows, and an older persona
    is never pushed.
    """

    def __init__(
        self, services: Services, session_id: str, emit: Emit, emit_error: EmitError
    ) -> None:
        self.services = services
        self.session_id = session_id
        self.user_id = ""
        self.welcomed = False  # pushes wait for `welcome`, which carries the avatar
        self._emit = emit
        self._emit_error = emit_error
        self.cached: StoredAvatar | None = None
        self._epoch = 0
        self._persona_version = 0  # the newest avatar version this session has seen
        self._told_version = 0  # the newest one its client was told about
        self._told_persona = ""
        self._lock = asyncio.Lock()
        self.switches = SwitchesInFlight()

    async def load(self, user_id: str) -> None:
        """At `hello`: create the user on first sight and read the avatar (again, if a change
        came in while it loaded)."""
        self.user_id = user_id
        store = self.services.store
        epoch = self._epoch
        avatar = await store.open_user(user_id)
        while epoch != self._epoch:  # a switch came in while it loaded
            epoch = self._epoch
            avatar = await store.get_avatar(user_id)
        self.cached = avatar
        if avatar is not None:
            self._seen(avatar)
            self._told(avatar.version, avatar.personality)

    async def current(self) -> StoredAvatar:
        """The cached avatar, or a fresh load (after this session's switches have committed);
        never caches its absence."""
        await self.switches.all_answered()
        avatar = self.cached
        if avatar is not None and self.services.cache_trusted:
            return avatar
        async with self._lock:
            for _ in range(MAX_AVATAR_READS):
                epoch, known = self._epoch, self._persona_version
                avatar = await self.services.store.get_avatar(self.user_id)
                if avatar is None:
                    raise NoAvatar()
                if avatar.version >= self._persona_version:
                    break
                if self._persona_version == known:
                    # Older than before the read, and nothing was notified meanwhile: the row
                    # itself went back (a restored database, an avatar made again). Believe it,
                    # and tell the client.
                    log.warning(
                        "session %s: the avatar's version went back from %d to %d",
                        self.session_id, known, avatar.version,
                    )  # fmt: skip
                    self._persona_version = avatar.version
                    self._told_version = min(self._told_version, avatar.version - 1)
                    break
                # Another connection's change was notified while this read was on its way: the
                # row is older than what this session knows (and may have told its client).
            else:
                raise Unavailable("the persona keeps changing; try again")
            self._seen(avatar)
            if epoch == self._epoch:
                self.cached = avatar
        if avatar.version > self._told_version:
            if self._told_persona:
                # a change this client was not told about (its notification is late, or was
                # missed while the listener was down, or the row went back): tell it now,
                # before the reply
                self._emit(
                    PersonaChanged(personality=avatar.personality, previous=self._told_persona)
                )
            self._told(avatar.version, avatar.personality)
        return avatar

    def clear_avatar_cache(self) -> None:
        self.cached = None
        self._epoch += 1

    def _seen(self, avatar: StoredAvatar) -> None:
        self._persona_version = max(self._persona_version, avatar.version)

    def _told(self, version: int, personality: str) -> None:
        """The client now knows this personality, at this version."""
        if version > self._told_version:
            self._told_version = version
            self._told_persona = personality

    async def create(self, frame: CreateAvatar) -> None:
        require_known(frame.personality)
        await self.switches.all_answered()  # a switch sent before must not apply to it
        async with self._lock:
            avatar = await self.services.store.create_avatar(
                self.user_id, frame.name, frame.personality
            )
            self.clear_avatar_cache()
            if avatar.version >= self._persona_version:  # else a switch was notified meanwhile
                self.cached = avatar
            self._seen(avatar)
            self._told(avatar.version, avatar.personality)
        self._emit(Avatar(ref=frame.id, avatar=avatar.info()))

    async def set_persona(self, personality: str, ref: str | None) -> None:
        """The one persona switch, for `set_persona` and `/persona` alike.

        Validate, clear this session's cached avatar, and hand the switch to the group commit
        without waiting for it: the chats read behind it are rendered with its personality, and
        the store writes them after it, only if it commits. Once it has, refill the cache with
        the committed row, acknowledge, and tell the user's other sessions; the acknowledgement
        leaves before the replies rendered after the switch.
        """
        require_known(personality)
        if self.switches.full:
            await self.switches.all_answered()
        switch = Switch(self.user_id, personality, self.services.origin)
        self.clear_avatar_cache()
        self.switches.started(switch)
        done = functools.partial(self._on_switched, switch, self._epoch, ref)
        self.services.store.add_switch(switch, done)

    def _on_switched(
        self,
        switch: Switch,
        epoch: int,
        ref: str | None,
        result: SwitchResult | None,
        error: BaseException | None,
    ) -> None:
        """The group commit's answer for this session's switch."""
        services = self.services
        # Nothing else emptied the cache meanwhile (a notification, a listener reconnect, a
        # later switch of this session). Nothing filled it either: loads and create_avatar wait
        # for this session's switches, and an earlier switch refills only an untouched cache.
        untouched = epoch == self._epoch
        self.switches.answered(switch)
        if error is not None:
            if not isinstance(error, Unavailable):
                log.error("session %s: switch failed: %r", self.session_id, error)
            self._emit_error(error if isinstance(error, Exception) else Unavailable(), ref)
            return
        if result is None:
            self._emit_error(NoAvatar(), ref)
            return
        avatar, previous = result.avatar, result.previous
        if untouched and result.newest and avatar.version >= self._persona_version:
            # The row this switch committed is what a reload would read now: the next chat
            # renders from it without another round trip. When anything else emptied the
            # cache meanwhile, or a later switch of this user is already committed, it
            # stays empty and the next chat reads the avatar.
            self.cached = avatar
        self._seen(avatar)
        self._told(avatar.version, avatar.personality)
        services.metrics.persona_switches.inc()
        self._emit(PersonaSet(ref=ref, personality=avatar.personality, previous=previous))
        services.hub.persona_changed(
            self.user_id, avatar.personality, previous, avatar.version, self
        )

    def on_persona_changed(self, personality: str, previous: str, version: int) -> None:
        """Another connection of this user switched persona: forget the cache, tell the client.

        A change no newer than one already loaded does not clear the cache, and one no newer
        than what the client was told is not pushed (notifications can arrive late, or twice),
        so an older persona never comes back.
        """
        if version > self._persona_version:
            self._persona_version = version
            self.clear_avatar_cache()
            # which of this change and a switch of ours in flight commits last is not known
            # yet: chats wait for ours, then read the avatar
            self.switches.contested()
        if self.welcomed and version > self._told_version:
            # before `welcome`, the avatar in it is the new one
            self._emit(PersonaChanged(personality=personality, previous=previous))
            self._told(version, personality)
