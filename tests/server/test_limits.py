"""Connection floods: the global limit, the per-user limit and the pre-auth budget."""

from __future__ import annotations

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from server.auth import mint_token
from tests.client import Client
from tests.conftest import SECRET, AppFactory, ClientFactory


async def test_global_connection_limit_refuses_handshake_with_503(
    make_app: AppFactory, connect: ClientFactory
) -> None:
    app = await make_app(max_connections=2)
    await connect(target=app)
    await connect(target=app)
    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(app.url):
            pass
    assert refused.value.response.status_code == 503


async def test_per_user_limit_closes_4429(
    make_app: AppFactory, connect: ClientFactory, user: str
) -> None:
    app = await make_app(max_connections_per_user=2)
    await connect(user, target=app)
    await connect(user, target=app)
    async with Client(app.url) as third:
        await third.send({"type": "hello", "token": mint_token(SECRET, user)})
        with pytest.raises(ConnectionClosed):
            await third.recv()
        assert third.conn.close_code == 4429
    other = await connect(target=app)  # another user is not affected
    assert other.welcome["type"] == "welcome"


async def test_unauthenticated_connections_count_against_the_preauth_budget(
    make_app: AppFactory,
) -> None:
    app = await make_app(max_preauth=2)
    async with Client(app.url) as first, Client(app.url) as _second:
        with pytest.raises(InvalidStatus) as refused:
            async with ws_connect(app.url):
                pass
        assert refused.value.response.status_code == 503
        await first.hello(mint_token(SECRET, "preauth-user"))
        async with Client(app.url) as third:  # a slot came free
            assert (await third.hello(mint_token(SECRET, "preauth-2")))["type"] == "welcome"
