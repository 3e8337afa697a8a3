"""Authentication: hello first, within the deadline, with a valid HS256 token."""

from __future__ import annotations

import time

import jwt
import pytest
from websockets.exceptions import ConnectionClosed

from protocol.errors import ConnectionRefused
from server.app import App
from server.auth import authenticate, mint_token
from tests.client import Client
from tests.conftest import SECRET, AppFactory


async def _closed_with(client: Client) -> tuple[int | None, str | None]:
    with pytest.raises(ConnectionClosed):
        for _ in range(5):
            await client.recv(timeout=5)
    return client.conn.close_code, client.conn.close_reason


async def test_hello_with_valid_token_gets_welcome_with_its_ref(app: App) -> None:
    async with Client(app.url) as client:
        welcome = await client.hello(mint_token(SECRET, "alice-auth"))
        assert (welcome["type"], welcome["user_id"], welcome["ref"]) == (
            "welcome",
            "alice-auth",
            "c1",
        )


async def test_no_hello_within_deadline_closes_4408(make_app: AppFactory) -> None:
    app = await make_app(hello_timeout_s=0.3)
    async with Client(app.url) as client:
        assert await _closed_with(client) == (4408, "no hello in time")


async def test_frame_before_hello_closes_4401(app: App) -> None:
    async with Client(app.url) as client:
        await client.send({"type": "ping", "id": "p"})
        assert await _closed_with(client) == (4401, "send hello first")


async def test_garbage_before_hello_closes_4401(app: App) -> None:
    async with Client(app.url) as client:
        await client.send_raw("not json")
        assert (await _closed_with(client))[0] == 4401


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (mint_token("another-secret-entirely-" + "x" * 64, "bob"), "bad token signature"),
        ("not.a.jwt", "malformed token"),
        (mint_token(SECRET, "bob", ttl_s=-60), "token expired"),
        (jwt.encode({"iat": int(time.time())}, SECRET, algorithm="HS256"), "malformed token"),
        (jwt.encode({"sub": "x" * 129}, SECRET, algorithm="HS256"), "sub must be a string"),
        (jwt.encode({"sub": 42}, SECRET, algorithm="HS256"), "malformed token"),
        (jwt.encode({"sub": "bob"}, SECRET, algorithm="HS512"), "malformed token"),
    ],
)
async def test_bad_token_closes_4401_with_reason(app: App, token: str, reason: str) -> None:
    async with Client(app.url) as client:
        await client.send({"type": "hello", "token": token})
        code, why = await _closed_with(client)
        assert code == 4401
        assert why is not None and why.startswith(reason)


async def test_token_without_exp_is_accepted(app: App) -> None:
    token = jwt.encode({"sub": "no-exp-user"}, SECRET, algorithm="HS256")
    async with Client(app.url) as client:
        assert (await client.hello(token))["user_id"] == "no-exp-user"


async def test_second_hello_is_an_invalid_frame(app: App) -> None:
    async with Client(app.url) as client:
        await client.hello(mint_token(SECRET, "twice"))
        answer = await client.request({"type": "hello", "token": mint_token(SECRET, "other")})
        assert (answer["code"], answer["status"]) == ("invalid_frame", 422)


# ---------------------------------------------------------------- clock skew, without a socket


def _token(**offsets: int) -> str:
    """A token whose time claims are these offsets from now, in seconds."""
    now = int(time.time())
    claims = {name: now + offset for name, offset in offsets.items()}
    return jwt.encode({"sub": "skewed", **claims}, SECRET, algorithm="HS256")


@pytest.mark.parametrize(
    "offsets",
    [
        {"exp": -10},  # expired by our clock, not by the issuer's
        {"iat": 20},  # issued "in the future": the issuer's clock is ahead
        {"nbf": 20},
    ],
)
def test_a_token_within_the_clock_skew_is_accepted(offsets: dict[str, int]) -> None:
    assert authenticate(SECRET, _token(**offsets)) == "skewed"


@pytest.mark.parametrize(
    ("offsets", "reason"),
    [
        ({"exp": -60}, "token expired"),
        ({"nbf": 60}, "token not valid yet"),
        ({"iat": 60}, "token not valid yet"),
    ],
)
def test_a_token_beyond_the_clock_skew_is_refused(offsets: dict[str, int], reason: str) -> None:
    with pytest.raises(ConnectionRefused) as refused:
        authenticate(SECRET, _token(**offsets))
    assert (refused.value.close_code, refused.value.reason) == (4401, reason)
