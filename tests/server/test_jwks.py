"""Tokens checked against a JWKS: keys made in the test with `cryptography`, the key set served
by a real local HTTP server, tokens sent in `hello` and as bearer tokens to the HTTP API."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from websockets.exceptions import ConnectionClosed

from server.app import App
from server.auth import mint_token
from server.jwks import usable_keys
from server.supervisor import reserve_port
from tests.client import Client
from tests.conftest import SECRET, AppFactory

ISSUER = "https://abcdefghijklmnop.supabase.co/auth/v1"
AUDIENCE = "authenticated"
JWKS_PATH = "/auth/v1/.well-known/jwks.json"


# ---------------------------------------------------------------- keys and tokens


@dataclass(frozen=True)
class Key:
    kid: str
    alg: str
    private: Any

    @property
    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        if self.alg == "ES256":
            data = ECAlgorithm.to_jwk(public, as_dict=True)
        elif self.alg == "RS256":
            data = RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            data = OKPAlgorithm.to_jwk(public, as_dict=True)
        return {**data, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def sign(self, alg: str | None = None, kid: str | None = None, **claims: Any) -> str:
        return jwt.encode(
            claims_for(**claims), self.private, algorithm=alg or self.alg,
            headers={"kid": kid or self.kid},
        )  # fmt: skip


def make_key(alg: str, kid: str) -> Key:
    if alg == "ES256":
        return Key(kid, alg, ec.generate_private_key(ec.SECP256R1()))
    if alg == "RS256":
        return Key(kid, alg, rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return Key(kid, alg, ed25519.Ed25519PrivateKey.generate())


def claims_for(**claims: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"sub": "jwks-user", "aud": AUDIENCE, "iss": ISSUER, "iat": now, "exp": now + 3600}
    return {k: v for k, v in {**base, **claims}.items() if v is not None}


def forged(header: dict[str, Any], claims: dict[str, Any], hmac_key: bytes | None) -> str:
    """A token built by hand: PyJWT refuses to sign HS256 with a public key, or to sign none."""

    def part(value: dict[str, Any]) -> bytes:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=")

    signing_input = part(header) + b"." + part(claims)
    signature = b""
    if hmac_key is not None:
        digest = hmac.new(hmac_key, signing_input, hashlib.sha256).digest()
        signature = base64.urlsafe_b64encode(digest).rstrip(b"=")
    return (signing_input + b"." + signature).decode()


# ---------------------------------------------------------------- the key set's server


class ReusePortServer(ThreadingHTTPServer):
    allow_reuse_port = True  # beside the holder of the port


class JwksServer:
    """A real HTTP server that serves `document` at JWKS_PATH and counts the fetches; it can
    be started late, on the port it holds from the start (down until then)."""

    def __init__(self) -> None:
        self._holder = reserve_port("127.0.0.1", 0)  # bound, not listening: refused
        self.port = self._holder.getsockname()[1]
        self.document: dict[str, Any] = {"keys": []}
        self.fetches = 0
        self._http: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{JWKS_PATH}"

    def serve(self, *keys: Key) -> None:
        self.document = {"keys": [key.jwk for key in keys]}

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.fetches += 1
                body = json.dumps(owner.document).encode()
                self.send_response(200 if self.path == JWKS_PATH else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._http = ReusePortServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        self._holder.close()


@pytest.fixture
def keys() -> dict[str, Key]:
    return {
        "es": make_key("ES256", "es-1"),
        "rs": make_key("RS256", "rs-1"),
        "ed": make_key("EdDSA", "ed-1"),
    }


@pytest.fixture
def jwks(keys: dict[str, Key]) -> Iterator[JwksServer]:
    server = JwksServer()
    server.serve(*keys.values())
    server.start()
    yield server
    server.stop()


def jwks_settings(server: JwksServer, api_port: int, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "jwt_jwks_url": server.url,
        "jwt_audience": AUDIENCE,
        "jwt_issuer": ISSUER,
        "jwt_secret": None,  # HS256 refused: the JWKS alone
        "api_port": api_port,
        "reuse_port": True,
    }
    return {**values, **overrides}


@pytest.fixture
async def app(make_app: AppFactory, jwks: JwksServer, api_port: int) -> App:
    return await make_app(**jwks_settings(jwks, api_port))


async def hello(app: App, token: str) -> tuple[str, str]:
    """("welcome", user id), or ("closed", "<code> <reason>")."""
    async with Client(app.url) as client:
        await client.send({"type": "hello", "id": "h", "token": token})
        try:
            frame = await client.recv(timeout=5)
            return ("welcome", frame["user_id"]) if frame["type"] == "welcome" else ("?", "")
        except ConnectionClosed:
            return "closed", f"{client.conn.close_code} {client.conn.close_reason}"


async def get_avatar(app: App, token: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=str(app.api_url), timeout=10) as http:
        return await http.get("/avatars/me", headers={"Authorization": f"Bearer {token}"})


# ---------------------------------------------------------------- accepted


@pytest.mark.parametrize("which", ["es", "rs", "ed"])
async def test_a_token_signed_by_a_key_of_the_set_is_accepted(
    app: App, keys: dict[str, Key], which: str
) -> None:
    token = keys[which].sign(sub=f"user-{which}")
    assert await hello(app, token) == ("welcome", f"user-{which}")
    assert (await get_avatar(app, token)).status_code == 404  # authenticated: no avatar yet


async def test_a_rotated_key_is_fetched_and_unknown_kids_fetch_at_most_once_per_30_s(
    app: App, jwks: JwksServer, keys: dict[str, Key]
) -> None:
    fetched = jwks.fetches
    rotated = make_key("ES256", "es-2")
    jwks.serve(rotated, keys["rs"])  # es-1 retired, es-2 new
    assert await hello(app, rotated.sign(sub="rotated")) == ("welcome", "rotated")
    assert jwks.fetches == fetched + 1
    made_up = keys["es"].sign(kid="es-made-up")
    assert await hello(app, made_up) == ("closed", "4401 unknown signing key")
    assert (await get_avatar(app, made_up)).json() == {"detail": "unknown signing key"}
    assert jwks.fetches == fetched + 1  # within 30 s of the last: not fetched again


async def test_hs256_is_taken_with_a_jwks_only_when_the_secret_is_set_too(
    make_app: AppFactory, jwks: JwksServer, api_port: int, keys: dict[str, Key]
) -> None:
    legacy = mint_token(SECRET, "legacy-user")
    only_jwks = await make_app(**jwks_settings(jwks, api_port))
    assert await hello(only_jwks, legacy) == (
        "closed",
        "4401 malformed token: alg HS256 is not accepted",
    )
    migrating = await make_app(**jwks_settings(jwks, api_port, jwt_secret=SECRET))
    legacy_claims = jwt.encode(claims_for(sub="legacy-user"), SECRET, algorithm="HS256")
    assert await hello(migrating, legacy_claims) == ("welcome", "legacy-user")
    assert await hello(migrating, keys["es"].sign(sub="new-user")) == ("welcome", "new-user")
    assert await hello(migrating, legacy) == ("closed", "4401 wrong audience")  # no aud


# ---------------------------------------------------------------- refused


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": int(time.time()) - 120}, "token expired"),
        ({"aud": "anon"}, "wrong audience"),
        ({"aud": None}, "wrong audience"),
        ({"iss": "https://elsewhere.supabase.co/auth/v1"}, "wrong issuer"),
        ({"iss": None}, "wrong issuer"),
    ],
)
async def test_a_token_with_bad_claims_is_refused_with_its_reason(
    app: App, keys: dict[str, Key], claims: dict[str, Any], reason: str
) -> None:
    token = keys["rs"].sign(**claims)
    assert await hello(app, token) == ("closed", f"4401 {reason}")
    response = await get_avatar(app, token)
    assert (response.status_code, response.json()) == (401, {"detail": reason})


def _pem(key: Key) -> bytes:
    return key.private.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


async def test_an_hs256_token_signed_with_the_rsa_public_key_is_refused(
    make_app: AppFactory, jwks: JwksServer, api_port: int, keys: dict[str, Key]
) -> None:
    """The algorithm-confusion attack: the public key used as an HMAC secret."""
    rsa_key = keys["rs"]
    header = {"alg": "HS256", "typ": "JWT", "kid": rsa_key.kid}
    confused = forged(header, claims_for(sub="attacker"), _pem(rsa_key))
    only_jwks = await make_app(**jwks_settings(jwks, api_port))
    assert await hello(only_jwks, confused) == (
        "closed",
        "4401 malformed token: alg HS256 is not accepted",
    )
    with_secret = await make_app(**jwks_settings(jwks, api_port, jwt_secret=SECRET))
    assert await hello(with_secret, confused) == ("closed", "4401 bad token signature")
    assert (await get_avatar(with_secret, confused)).status_code == 401


async def test_alg_none_is_refused(app: App, keys: dict[str, Key]) -> None:
    for alg in ("none", "None", "NONE"):
        header = {"alg": alg, "typ": "JWT", "kid": keys["es"].kid}
        unsigned = forged(header, claims_for(sub="attacker"), None)
        assert await hello(app, unsigned) == ("closed", "4401 unsigned token (alg none)")
        assert (await get_avatar(app, unsigned)).status_code == 401


async def test_a_token_whose_alg_is_not_its_keys_is_refused(app: App, keys: dict[str, Key]) -> None:
    """Signed with the EC key, but naming the RSA key's kid (and the other way round)."""
    ec_as_rsa = keys["es"].sign(kid=keys["rs"].kid)
    assert await hello(app, ec_as_rsa) == (
        "closed",
        "4401 token alg ES256 does not match its key (RS256)",
    )
    rsa_as_ec = keys["rs"].sign(kid=keys["es"].kid)
    assert (await get_avatar(app, rsa_as_ec)).json() == {
        "detail": "token alg RS256 does not match its key (ES256)"
    }


# ---------------------------------------------------------------- the key set unreachable


async def test_the_jwks_down_at_start_refuses_tokens_until_it_comes_back(
    make_app: AppFactory, api_port: int, keys: dict[str, Key]
) -> None:
    down = JwksServer()
    down.serve(*keys.values())
    try:
        app = await make_app(**jwks_settings(down, api_port))  # starts all the same
        token = keys["es"].sign(sub="patient")
        assert await hello(app, token) == ("closed", "4401 cannot verify tokens now")
        response = await get_avatar(app, token)
        assert (response.status_code, response.json()) == (
            503,
            {"detail": "cannot verify tokens now"},
        )
        assert response.headers["retry-after"] == "5"
        async with httpx.AsyncClient(timeout=5) as http:
            ready = await http.get(f"http://127.0.0.1:{app.port}/readyz")
            assert (ready.status_code, ready.text) == (
                503,
                "cannot verify tokens now: the JWKS cannot be fetched\n",
            )
            down.start()
            async with asyncio.timeout(15):  # fetched again with a growing wait (0.5 s, 1 s...)
                while (await http.get(f"http://127.0.0.1:{app.port}/readyz")).status_code != 200:
                    await asyncio.sleep(0.1)
        assert await hello(app, token) == ("welcome", "patient")
        assert (await get_avatar(app, token)).status_code == 404
    finally:
        down.stop()


# ---------------------------------------------------------------- the set's contents


def test_only_asymmetric_signing_keys_with_a_kid_are_used(keys: dict[str, Key]) -> None:
    document = {
        "keys": [
            keys["es"].jwk,
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac", "alg": "HS256"},  # never trusted
            {**keys["rs"].jwk, "kid": None},
            {**keys["ed"].jwk, "use": "enc"},
            {"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AA", "y": "AA"},
            "not a key",
        ]
    }
    assert set(usable_keys(document)) == {"es-1"}
    with pytest.raises(ValueError, match="no usable signing key"):
        usable_keys({"keys": [document["keys"][1]]})
    with pytest.raises(ValueError, match="not a JWKS document"):
        usable_keys({"nope": []})
