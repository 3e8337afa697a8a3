"""The I/O a session's conversation asks for (server/session.py carries out its actions): each
piece awaits the store or checks a token, then feeds what came back into the conversation."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from protocol.conversation.actions import Action
from protocol.conversation.chats import KNOWN_IDS
from protocol.conversation.core import Conversation
from protocol.conversation.records import StoredTurn, SwitchResult
from protocol.errors import (
    CloseCode,
    ConnectionRefused,
    Overloaded,
    ProtocolError,
    Unavailable,
)
from server.failures import as_protocol_error
from server.hub import Listener
from server.services import Services

log = logging.getLogger("server.session")

Feed = Callable[[list[Action]], None]


class Effects:
    """One session's I/O, whose outcomes go back into its conversation through `feed`."""

    __slots__ = ("_conversation", "_feed", "_member", "_services", "_session_id", "user_id")

    def __init__(
        self,
        services: Services,
        conversation: Conversation,
        session_id: str,
        member: Listener,
        feed: Feed,
    ) -> None:
        self._services = services
        self._conversation = conversation
        self._session_id = session_id
        self._member = member  # what the hub tells of this user's changes
        self._feed = feed
        self.user_id = ""  # once the token is checked: the hub knows the session by it

    def turn_done(self, key: int, stored: StoredTurn | None, error: BaseException | None) -> None:
        conversation = self._conversation
        if stored is not None:
            self._feed(conversation.turn_committed(key, stored, time.monotonic()))
        else:
            self._feed(conversation.chat_failed(key, self.failure(error)))

    def switch_done(
        self, key: int, result: SwitchResult | None, error: BaseException | None
    ) -> None:
        if error is None:
            self._feed(self._conversation.switch_committed(key, result))
        else:
            self._feed(self._conversation.switch_failed(key, self.failure(error)))

    def failure(self, error: BaseException | None) -> ProtocolError:
        return as_protocol_error(error or Unavailable(), self._session_id)

    async def authenticate(self, token: str) -> None:
        """Check the token, admit the user, read its avatar and its newest chat ids."""
        services = self._services
        conversation = self._conversation
        try:
            user_id = await services.verifier.verify(token)
            limit = services.settings.max_connections_per_user
            if services.hub.count(user_id) >= limit:
                raise ConnectionRefused(
                    CloseCode.TOO_MANY_CONNECTIONS,
                    f"too many connections for this user (max {limit})",
                )
            # Join before reading, so that a switch committed meanwhile reaches this session.
            self.user_id = user_id
            services.hub.join(user_id, self._member)
            try:
                avatar = await services.store.open_user(user_id)
                stored_ids = await services.store.recent_chat_ids(user_id, KNOWN_IDS)
            except Overloaded:  # a kind of Unavailable: the database is up, the process is not
                raise ConnectionRefused(CloseCode.TRY_AGAIN_LATER, "overloaded") from None
            except Unavailable:
                raise ConnectionRefused(CloseCode.INTERNAL_ERROR, "database unavailable") from None
        except ConnectionRefused as exc:
            log.info("session %s refused: %d %s", self._session_id, exc.close_code, exc.reason)
            self._feed(conversation.refused(exc.close_code, exc.reason))
            return
        except Exception as exc:
            self.failure(exc)  # logged: a bug
            self._feed(conversation.refused(CloseCode.INTERNAL_ERROR, "internal error"))
            return
        self._feed(conversation.authenticated(user_id, avatar, stored_ids))

    async def load_avatar(self) -> None:
        try:
            avatar = await self._services.store.get_avatar(self.user_id)
        except Exception as exc:
            self._feed(self._conversation.avatar_failed(self.failure(exc)))
            return
        self._feed(self._conversation.avatar_loaded(avatar))

    async def create_avatar(self, name: str, personality: str) -> None:
        try:
            avatar = await self._services.store.create_avatar(self.user_id, name, personality)
        except Exception as exc:
            self._feed(self._conversation.avatar_failed(self.failure(exc)))
            return
        self._feed(self._conversation.avatar_created(avatar))

    async def read_history(self, limit: int, before: int | None) -> None:
        try:
            messages = await self._services.store.history(self.user_id, limit, before)
        except Exception as exc:
            self._feed(self._conversation.history_failed(self.failure(exc)))
            return
        self._feed(self._conversation.history_read(messages, time.monotonic()))

    async def replay(self, key: int, client_id: str) -> None:
        try:
            past = await self._services.store.find_turn(self.user_id, client_id)
        except Exception as exc:
            self._feed(self._conversation.chat_failed(key, self.failure(exc)))
            return
        if past is None:
            self._feed(self._conversation.replay_missing(key))
        else:
            log.debug("session %s: chat %r is a retry of a stored one", self._session_id, client_id)
            self._feed(self._conversation.replay_found(key, past))
