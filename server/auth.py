"""Authentication: the HS256 secret, token minting for `run.py token`, and token checks (HS256,
and ES256, RS256 and EdDSA against a JWKS)."""

from __future__ import annotations

import logging
import os
import secrets
import time

import jwt

from protocol.errors import CloseCode, ConnectionRefused
from server.jwks import ALGORITHMS, KeySet, KeysUnavailable
from server.settings import Settings

log = logging.getLogger(__name__)

MAX_SUBJECT_CHARS = 128
CLOCK_SKEW_S = 30  # leeway on `iat`, `nbf` and `exp`: the issuer's clock may differ from ours
CANNOT_VERIFY = "cannot verify tokens now"


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
    """The user id in a valid HS256 token; ConnectionRefused(4401) otherwise. Never logs the
    token."""
    return decode_subject(token, secret, "HS256")


def decode_subject(
    token: str,
    key: str | jwt.PyJWK,
    algorithm: str,
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    """The `sub` of a token signed with `key` by `algorithm`, whose `aud` and `iss` are these
    when given; ConnectionRefused(4401) with the reason otherwise."""
    required = ["sub"] + (["aud"] if audience else []) + (["iss"] if issuer else [])
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            audience=audience,
            issuer=issuer,
            options={"require": required, "verify_exp": True, "verify_aud": bool(audience)},
            leeway=CLOCK_SKEW_S,
        )
    except jwt.ExpiredSignatureError:
        raise refused("token expired") from None
    except jwt.ImmatureSignatureError:
        raise refused("token not valid yet") from None
    except jwt.InvalidSignatureError:
        raise refused("bad token signature") from None
    except jwt.InvalidAudienceError:
        raise refused("wrong audience") from None
    except jwt.InvalidIssuerError:
        raise refused("wrong issuer") from None
    except jwt.MissingRequiredClaimError as exc:
        if exc.claim in ("aud", "iss"):
            raise refused(f"wrong {'audience' if exc.claim == 'aud' else 'issuer'}") from None
        raise refused("malformed token") from None
    except jwt.InvalidTokenError:
        raise refused("malformed token") from None
    return _subject(claims)


def _subject(claims: dict[str, object]) -> str:
    subject = claims.get("sub")
    if not isinstance(subject, str) or not 1 <= len(subject) <= MAX_SUBJECT_CHARS:
        raise refused(f"sub must be a string of 1 to {MAX_SUBJECT_CHARS} chars")
    if "\x00" in subject:
        raise refused("sub holds a NUL character")
    try:
        subject.encode("utf-8")
    except UnicodeEncodeError:
        raise refused("sub is not valid Unicode") from None
    return subject


def refused(reason: str) -> ConnectionRefused:
    return ConnectionRefused(CloseCode.NOT_AUTHENTICATED, reason)


class CannotVerify(ConnectionRefused):
    """The token may be good, but the keys to check it cannot be had now (the JWKS is
    unreachable): close 4401 on a socket, 503 over HTTP."""

    def __init__(self) -> None:
        super().__init__(CloseCode.NOT_AUTHENTICATED, CANNOT_VERIFY)


def accepts_hs256(settings: Settings) -> bool:
    """HS256 tokens are refused once a JWKS is configured, unless CHAT_JWT_SECRET is set too
    (both at once: how a Supabase project migrates). The workers of `serve --workers N` are told
    the supervisor's answer, since their CHAT_JWT_SECRET is always set."""
    if settings.jwt_hs256 is not None:
        return settings.jwt_hs256
    return settings.jwt_jwks_url is None or settings.jwt_secret is not None


class Verifier:
    """Checks tokens for `hello` and for the HTTP API alike: HS256 with the secret (unless
    refused, see `accepts_hs256`), and ES256, RS256 or EdDSA with the key of the JWKS that the
    token's `kid` names; `aud` and `iss` when configured. `alg: none`, other algorithms, and a
    token whose `alg` is not its key's are refused."""

    def __init__(self, settings: Settings, secret: str) -> None:
        self._secret = secret if accepts_hs256(settings) else None
        url = settings.jwt_jwks_url
        self.keys = None if url is None else KeySet(url, settings.jwt_jwks_max_age_s)
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer

    @property
    def accepts_hs256(self) -> bool:
        return self._secret is not None

    @property
    def ready(self) -> bool:
        """Whether tokens can be checked now (False while the JWKS has never been fetched)."""
        return self.keys is None or self.keys.available

    async def start(self) -> None:
        if self.keys is not None:
            await self.keys.start()

    async def aclose(self) -> None:
        if self.keys is not None:
            await self.keys.aclose()

    async def verify(self, token: str) -> str:
        """The user id in a valid token; ConnectionRefused(4401) with the reason otherwise, and
        CannotVerify when the keys cannot be had now. Never logs the token."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise refused("malformed token") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str):
            raise refused("malformed token")
        if algorithm.lower() == "none":
            raise refused("unsigned token (alg none)")
        if algorithm == "HS256" and self._secret is not None:
            return decode_subject(token, self._secret, "HS256", self._audience, self._issuer)
        if algorithm not in ALGORITHMS or self.keys is None:
            raise refused(f"malformed token: alg {algorithm[:16]} is not accepted")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise refused("token has no kid")
        try:
            key = await self.keys.key(kid)
        except KeysUnavailable:
            raise CannotVerify() from None
        if key is None:
            raise refused("unknown signing key")
        if key.algorithm_name != algorithm:
            raise refused(f"token alg {algorithm} does not match its key ({key.algorithm_name})")
        return decode_subject(token, key, algorithm, self._audience, self._issuer)
