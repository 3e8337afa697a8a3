"""Shared fixtures: one embedded PostgreSQL per test run, a real server per test, real clients."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from typing import Any

import asyncpg
import pytest

from server.app import App
from server.embedded import EmbeddedPostgres
from server.settings import Settings
from server.supervisor import reserve_port
from tests.chromium import install_for_page_test
from tests.client import Client, login
from tests.personas import BUILTIN_IDS, remove_personas

SECRET = "test-secret-for-the-suite-only-" + "0123456789abcdef" * 3


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    install_for_page_test(config, items)  # Debian's Chromium, when the page test will need it


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`DATABASE_URL` when set; otherwise an embedded PostgreSQL started once for the run."""
    external = Settings().database_url
    if external:
        yield external
        return
    pg = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "pgdata")
    uri = pg.start()
    try:
        yield uri
    finally:
        pg.stop()


@pytest.fixture(autouse=True)
async def catalogue_as_it_was(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """A test that adds personas to the run's shared database leaves the catalogue as it
    found it, so that another test sees the six built-ins it expects (and nothing else)."""
    if "database_url" not in request.fixturenames:
        yield
        return
    dsn: str = request.getfixturevalue("database_url")
    before = await persona_ids(dsn)
    yield
    added = sorted(await persona_ids(dsn) - before - set(BUILTIN_IDS))
    if added:
        await remove_personas(dsn, added)


async def persona_ids(dsn: str) -> set[str]:
    """The catalogue's ids (none before the first migration)."""
    conn = await asyncpg.connect(dsn)
    try:
        return {row["id"] for row in await conn.fetch("SELECT id FROM personas")}
    except asyncpg.UndefinedTableError:
        return set()
    finally:
        await conn.close()


def settings_for_tests(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "api_port": 0,  # off unless a test asks for it (0 turns it off)
        "jwt_secret": SECRET,
        "db_pool_min": 1,
        "db_pool_max": 4,
        "drain_timeout_s": 5.0,
        # In-process servers share their loop with the test and its fixtures, whose blocking
        # moments are not the server's load: shedding is off unless a test asks for it.
        "overload_lag_ms": 0,
    }
    values.update(overrides)
    return Settings(**values)


AppFactory = Callable[..., Awaitable[App]]


@pytest.fixture
async def make_app(database_url: str) -> AsyncIterator[AppFactory]:
    """Start real servers on port 0 with the given settings; stop them after the test."""
    apps: list[App] = []

    async def factory(**overrides: Any) -> App:
        app = App(settings_for_tests(**overrides), database_url, SECRET)
        await app.start()
        apps.append(app)
        return app

    yield factory
    for app in apps:
        await app.stop()


@pytest.fixture
async def app(make_app: AppFactory) -> App:
    return await make_app()


@pytest.fixture
def api_port() -> Iterator[int]:
    """A port held for the test (SO_REUSEPORT, not listening), for a server's API to bind."""
    holder = reserve_port("127.0.0.1", 0)
    try:
        yield holder.getsockname()[1]
    finally:
        holder.close()


@pytest.fixture
def refused_url() -> Iterator[str]:
    """An LLM endpoint on a port that is bound but never listens: every connection to it is
    refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


@pytest.fixture
def user() -> str:
    return f"user-{uuid.uuid4().hex[:12]}"


ClientFactory = Callable[..., Awaitable[Client]]


@pytest.fixture
async def connect(app: App) -> AsyncIterator[ClientFactory]:
    """Log in as a user (a fresh one unless named) on the test's server."""
    async with AsyncExitStack() as stack:

        async def factory(user: str | None = None, target: App | None = None) -> Client:
            name = user or f"user-{uuid.uuid4().hex[:12]}"
            client = await login((target or app).url, SECRET, name)
            stack.push_async_callback(client.__aexit__, None, None, None)
            return client

        yield factory


async def with_avatar(client: Client, personality: str = "friendly") -> dict[str, Any]:
    answer = await client.request(
        {"type": "create_avatar", "name": "Ava", "personality": personality}
    )
    assert answer["type"] == "avatar", answer
    return answer


async def slow_client(
    make_app: AppFactory, connect: ClientFactory, delay_ms: float, user: str | None = None
) -> tuple[App, Client]:
    """A server whose template replies stream slowly (`delay_ms` between pieces), and a client
    of it with an avatar: how tests get a reply in flight."""
    app = await make_app(template_delay_ms=delay_ms)
    client = await connect(user, target=app)
    await with_avatar(client)
    return app, client
