"""Authentication: the HS256 secret, token minting for `run.py token`, and token checks."""

from __future__ import annotations

import logging
import os
import secrets
import time

import jwt

from protocol.errors import CloseCode, ConnectionRefused
from server.settings import Settings

log = logging.getLogger(__name__)

MAX_SUBJECT_CHARS = 128
CLOCK_SKEW_S = 30  # leeway on `iat`, `nbf` and `exp`: the issuer's clock may differ from ours


def load_or_create_secret(settings: Settings) -> str:
    """`CHAT_JWT_SECRET` when set; else a random secret kept in the data directory (mode 0600)."""
    if settings.jwt_secret is not None:
        return settings.jwt_secret.get_secret_value()
    path = settings.secret_path()
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secret + "\n")
    log.info("generated a new JWT secret in %s", path)
    return secret


def mint_token(secret: str, user_id: str, ttl_s: float | None = None) -> str:
    """A signed HS256 token whose `sub` is `user_id`, expiring after `ttl_s` when given."""
    if not 1 <= len(user_id) <= MAX_SUBJECT_CHARS:
        raise ValueError(f"a user id has 1 to {MAX_SUBJECT_CHARS} characters")
    now = int(time.time())
    claims: dict[str, object] = {"sub": user_id, "iat": now}
    if ttl_s is not None:
        claims["exp"] = now + int(ttl_s)
    return jwt.encode(claims, secret, algorithm="HS256")


def authenticate(secret: str, token: str) -> str:
    """The user id in a valid token; ConnectionRefused(4401) otherwise. Never logs the token."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            options={"require": ["sub"], "verify_exp": True},
            leeway=CLOCK_SKEW_S,
        )
    except jwt.ExpiredSignatureError:
        raise ConnectionRefused(CloseCode.NOT_AUTHENTICATED, "token expired") from None
    except jwt.ImmatureSignatureError:
        raise ConnectionRefused(CloseCode.NOT_AUTHENTICATED, "token not valid yet") from None
    except jwt.InvalidSignatureError:
        raise ConnectionRefused(CloseCode.NOT_AUTHENTICATED, "bad token signature") from None
    except jwt.InvalidTokenError:
        raise ConnectionRefused(CloseCode.NOT_AUTHENTICATED, "malformed token") from None
    subject = claims.get("sub")
    if not isinstance(subject, str) or not 1 <= len(subject) <= MAX_SUBJECT_CHARS:
        raise ConnectionRefused(
            CloseCode.NOT_AUTHENTICATED, f"sub must be a string of 1 to {MAX_SUBJECT_CHARS} chars"
        )
    if "\x00" in subject:
        raise ConnectionRefused(CloseCode.NOT_AUTHENTICATED, "sub holds a NUL character")
    try:
        subject.encode("utf-8")
    except UnicodeEncodeError:
        raise ConnectionRefused(CloseCode.NOT_AUTHENTICATED, "sub is not valid Unicode") from None
    return subject
