"""The protocol's error tree: every error code and close code, with the status it implies.

Grouped by origin, as asyncpg groups its errors: `ClientError` for what the client got wrong
(4xx: answered, the connection goes on), `ServiceError` for what failed on this side (5xx), and
`ConnectionRefused` for what ends the connection, carrying its close code."""

from __future__ import annotations

from enum import IntEnum
from typing import Any, ClassVar


class CloseCode(IntEnum):
    """WebSocket close codes named in PROTOCOL.md."""

    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    NOT_AUTHENTICATED = 4401
    AUTH_TIMEOUT = 4408
    TOO_MANY_CONNECTIONS = 4429


class ProtocolError(Exception):
    """Base of every error that is answered with an `error` frame."""

    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500
    default_message: ClassVar[str] = "internal error"

    def __init__(self, message: str | None = None, details: dict[str, Any] | None = None):
        self.message = message or self.default_message
        self.details = details
        super().__init__(self.message)


class ClientError(ProtocolError):
    """The client's mistake (a 4xx status): answered with an `error` frame, nothing logged."""

    status: ClassVar[int] = 400


class ServiceError(ProtocolError):
    """A failure on this side (a 5xx status): the database, the reply generator, or a bug."""

    status: ClassVar[int] = 500


class BadJson(ClientError):
    code = "bad_json"
    status = 400
    default_message = "a frame must be one UTF-8 text frame holding one JSON object"


class InvalidFrame(ClientError):
    code = "invalid_frame"
    status = 422
    default_message = "the frame does not match the protocol"


class InvalidPersona(ClientError):
    code = "invalid_persona"
    status = 422
    default_message = "unknown personality"


class PersonaUnavailable(ClientError):
    """The avatar's persona was disabled (or removed) in the catalogue: no reply is rendered
    with it, and the avatar keeps it until the user switches."""

    code = "persona_unavailable"
    status = 409
    default_message = "the avatar's personality is not available now; choose another one"


class UnknownCommand(ClientError):
    code = "unknown_command"
    status = 422
    default_message = "unknown command; send /help for the list"


class NoAvatar(ClientError):
    code = "no_avatar"
    status = 404
    default_message = "this user has no avatar yet; send create_avatar first"


class AvatarExists(ClientError):
    code = "avatar_exists"
    status = 409
    default_message = "this user already has an avatar"


class Busy(ClientError):
    code = "busy"
    status = 409
    default_message = "too many chats waiting; wait for a reply first"


class NothingToCancel(ClientError):
    code = "nothing_to_cancel"
    status = 409
    default_message = "no reply is in flight"


class DuplicateId(ClientError):
    code = "duplicate_id"
    status = 409
    default_message = "this id was already used for a different message"


class RateLimited(ClientError):
    code = "rate_limited"
    status = 429
    default_message = "too many frames; slow down"


class Unavailable(ServiceError):
    code = "unavailable"
    status = 503
    default_message = "a backing service is unreachable; try again shortly"


class Overloaded(Unavailable):
    """The process is out of CPU: a new chat is refused before anything of it is written, and a
    database call that timed out meanwhile is reported as this, not as the database being
    unreachable. A kind of `Unavailable`, so that what handles that handles this too; its
    `details` carry `retry_after_ms`."""

    code = "overloaded"
    status = 503
    default_message = "the server is overloaded; try again after the delay in retry_after_ms"


class Internal(ServiceError):
    code = "internal"
    status = 500
    default_message = "internal error"


ERROR_CLASSES: tuple[type[ProtocolError], ...] = (
    BadJson,
    InvalidFrame,
    InvalidPersona,
    UnknownCommand,
    NoAvatar,
    AvatarExists,
    Busy,
    NothingToCancel,
    DuplicateId,
    PersonaUnavailable,
    RateLimited,
    Unavailable,
    Overloaded,
    Internal,
)
ERROR_CODES: tuple[str, ...] = tuple(cls.code for cls in ERROR_CLASSES)


class ConnectionRefused(Exception):
    """An error that ends the connection with a close code instead of an error frame."""

    def __init__(self, close_code: CloseCode, reason: str):
        self.close_code = close_code
        self.reason = reason
        super().__init__(f"{int(close_code)} {reason}")
