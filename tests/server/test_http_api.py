"""The HTTP API against a real server, a real PostgreSQL and a real HTTP client (httpx): every
endpoint, bad bodies, limits, CORS, and a PATCH reaching an open socket."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from server.app import App
from server.auth import mint_token
from tests.client import Client
from tests.conftest import SECRET, AppFactory, ClientFactory, with_avatar
from tests.personas import BUILTIN_IDS
from tests.processes import ROOT, run_py


@pytest.fixture
async def app(make_app: AppFactory, api_port: int) -> App:
    return await make_app(api_port=api_port, reuse_port=True)


@pytest.fixture
async def http(app: App) -> AsyncIterator[httpx.AsyncClient]:
    assert app.api_url is not None
    async with httpx.AsyncClient(base_url=app.api_url, timeout=10) as client:
        yield client


def auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SECRET, user)}"}


async def avatar_row(database_url: str, user: str) -> tuple[str, int] | None:
    """The avatar's personality and version as stored."""
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT personality, version FROM avatars WHERE user_id = $1", user
        )
    finally:
        await conn.close()
    return None if row is None else (row["personality"], row["version"])


async def create(http: httpx.AsyncClient, user: str, personality: str = "friendly") -> Any:
    response = await http.post(
        "/avatars", json={"name": "Ava", "personality": personality}, headers=auth(user)
    )
    assert response.status_code == 201, response.text
    return response.json()


# ---------------------------------------------------------------- the endpoints


async def test_get_avatar_is_404_before_one_is_created(http: httpx.AsyncClient, user: str) -> None:
    response = await http.get("/avatars/me", headers=auth(user))
    assert response.status_code == 404
    assert response.json() == {"detail": "this user has no avatar yet; POST /avatars first"}


async def test_post_avatar_creates_it_and_get_reads_it_back(
    http: httpx.AsyncClient, user: str
) -> None:
    response = await http.post(
        "/avatars", json={"name": "Ava", "personality": "caring"}, headers=auth(user)
    )
    assert (response.status_code, response.headers["location"]) == (201, "/avatars/me")
    created = response.json()
    assert (created["name"], created["personality"]) == ("Ava", "caring")
    read = await http.get("/avatars/me", headers=auth(user))
    assert (read.status_code, read.json()) == (200, created)


async def test_second_post_avatar_is_409(http: httpx.AsyncClient, user: str) -> None:
    await create(http, user)
    again = await http.post(
        "/avatars", json={"name": "Bo", "personality": "witty"}, headers=auth(user)
    )
    assert (again.status_code, again.json()) == (409, {"detail": "this user already has an avatar"})


async def test_post_avatar_with_unknown_personality_is_422_and_writes_nothing(
    http: httpx.AsyncClient, user: str, database_url: str
) -> None:
    response = await http.post(
        "/avatars", json={"name": "Ava", "personality": "grumpy"}, headers=auth(user)
    )
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert (error["loc"], error["type"]) == (["body", "personality"], "invalid_persona")
    assert error["msg"].startswith("unknown personality 'grumpy'")
    assert await avatar_row(database_url, user) is None


@pytest.mark.parametrize(
    "body",
    [
        '{"personality": "\\ud800"}',
        '{"name": "\\ud800", "personality": "witty"}',
        '{"\\ud800": 1, "personality": "witty"}',
    ],
)
async def test_a_lone_surrogate_escape_in_a_body_is_a_clear_error_not_a_crash(
    http: httpx.AsyncClient, user: str, body: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The 422's errors quote the input, which orjson cannot write with a lone surrogate: it
    was a 500 with a traceback."""
    headers = {**auth(user), "Content-Type": "application/json"}
    for method, path in (("PATCH", "/avatars/me/persona"), ("POST", "/avatars")):
        response = await http.request(method, path, content=body, headers=headers)
        assert response.status_code in (400, 422), response.text
        assert response.json()["detail"]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_patch_persona_answers_new_and_previous_and_commits(
    http: httpx.AsyncClient, user: str, database_url: str
) -> None:
    await create(http, user, "friendly")
    response = await http.patch(
        "/avatars/me/persona", json={"personality": "witty"}, headers=auth(user)
    )
    assert response.status_code == 200
    body = response.json()
    assert (body["personality"], body["previous"]) == ("witty", "friendly")
    assert (body["avatar"]["personality"], body["avatar"]["name"]) == ("witty", "Ava")
    assert await avatar_row(database_url, user) == ("witty", 2)


async def test_patch_persona_without_avatar_is_404(http: httpx.AsyncClient, user: str) -> None:
    response = await http.patch(
        "/avatars/me/persona", json={"personality": "witty"}, headers=auth(user)
    )
    assert (response.status_code, response.json()["detail"]) == (
        404,
        "this user has no avatar yet; POST /avatars first",
    )


async def test_personas_is_the_catalogue(http: httpx.AsyncClient, user: str) -> None:
    response = await http.get("/personas", headers=auth(user))
    assert response.status_code == 200
    assert tuple(p["id"] for p in response.json()) == BUILTIN_IDS
    assert all(p["name"] and p["description"] for p in response.json())


async def test_messages_pages_the_history_oldest_first(
    http: httpx.AsyncClient, connect: ClientFactory, user: str
) -> None:
    client = await connect(user)
    await with_avatar(client)
    for text in ("one", "two", "three"):
        await client.request({"type": "chat", "text": text})
    newest = await http.get("/avatars/me/messages", params={"limit": 2}, headers=auth(user))
    assert newest.status_code == 200
    page = newest.json()["messages"]
    assert [m["role"] for m in page] == ["user", "assistant"]
    assert page[0]["text"] == "three"
    older = await http.get(
        "/avatars/me/messages", params={"limit": 50, "before": page[0]["id"]}, headers=auth(user)
    )
    texts = [m["text"] for m in older.json()["messages"] if m["role"] == "user"]
    assert texts == ["one", "two"]


@pytest.mark.parametrize("query", [{"limit": 0}, {"limit": 101}, {"limit": "x"}, {"before": 0}])
async def test_messages_with_a_bad_query_is_422(
    http: httpx.AsyncClient, user: str, query: dict[str, Any]
) -> None:
    response = await http.get("/avatars/me/messages", params=query, headers=auth(user))
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][0] == "query"


# ---------------------------------------------------------------- authentication


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/avatars/me"),
        ("POST", "/avatars"),
        ("PATCH", "/avatars/me/persona"),
        ("GET", "/avatars/me/messages"),
        ("GET", "/personas"),
    ],
)
async def test_no_token_is_401_with_www_authenticate(
    http: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await http.request(method, path, json={"personality": "witty"})
    assert (response.status_code, response.headers["www-authenticate"]) == (401, "Bearer")
    assert response.json()["detail"].startswith("not authenticated")


@pytest.mark.parametrize(
    ("header", "detail"),
    [
        (f"Bearer {mint_token('another-secret-' + 'x' * 40, 'bob')}", "bad token signature"),
        (f"Bearer {mint_token(SECRET, 'bob', ttl_s=-60)}", "token expired"),
        ("Bearer not.a.jwt", "malformed token"),
        (f"Basic {mint_token(SECRET, 'bob')}", "not authenticated"),
    ],
)
async def test_a_bad_token_is_401_with_the_reason_hello_gives(
    http: httpx.AsyncClient, header: str, detail: str
) -> None:
    response = await http.get("/avatars/me", headers={"Authorization": header})
    assert (response.status_code, response.headers["www-authenticate"]) == (401, "Bearer")
    assert response.json()["detail"].startswith(detail)


# ---------------------------------------------------------------- bad bodies


@pytest.mark.parametrize(
    ("content", "status", "kind"),
    [
        (b'{"personality": ', 400, "json_invalid"),
        (b'{"personality": 5}', 422, "string_type"),
        (b'{"personality": "witty", "mood": "sunny"}', 422, "extra_forbidden"),
        (b'{"personality": ""}', 422, "invalid_persona"),
        (b'{"personality": "grumpy"}', 422, "invalid_persona"),
        (b'["witty"]', 422, "model_attributes_type"),
        (b"{}", 422, "missing"),
    ],
)
async def test_a_bad_body_gets_its_own_4xx_and_writes_nothing(
    http: httpx.AsyncClient,
    user: str,
    database_url: str,
    content: bytes,
    status: int,
    kind: str,
) -> None:
    await create(http, user, "friendly")
    response = await http.patch(
        "/avatars/me/persona",
        content=content,
        headers={**auth(user), "Content-Type": "application/json"},
    )
    assert response.status_code == status, response.text
    assert [e["type"] for e in response.json()["detail"]] == [kind]
    assert await avatar_row(database_url, user) == ("friendly", 1)


async def test_a_body_over_16_kib_is_413_and_writes_nothing(
    http: httpx.AsyncClient, user: str, database_url: str
) -> None:
    await create(http, user, "friendly")
    body = json.dumps({"personality": "witty", "pad": "x" * 16 * 1024}).encode()
    response = await http.patch(
        "/avatars/me/persona",
        content=body,
        headers={**auth(user), "Content-Type": "application/json"},
    )
    assert (response.status_code, response.json()) == (
        413,
        {"detail": "the body is larger than 16384 bytes"},
    )

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    chunked = await http.patch(
        "/avatars/me/persona",
        content=chunks(),
        headers={**auth(user), "Content-Type": "application/json"},
    )
    assert chunked.status_code == 413
    assert await avatar_row(database_url, user) == ("friendly", 1)


# ---------------------------------------------------------------- limits, CORS, documents


async def test_requests_over_the_users_rate_get_429_with_retry_after(
    make_app: AppFactory, api_port: int, user: str
) -> None:
    app = await make_app(api_port=api_port, reuse_port=True, rate_per_s=0.5, rate_burst=3)
    async with httpx.AsyncClient(base_url=str(app.api_url), timeout=10) as http:
        statuses = [(await http.get("/avatars/me", headers=auth(user))).status_code for _ in "1234"]
        limited = await http.get("/avatars/me", headers=auth(user))
        other = await http.get("/avatars/me", headers=auth(user + "-other"))
    assert statuses == [404, 404, 404, 429]
    assert (limited.status_code, limited.headers["retry-after"]) == (429, "2")
    assert other.status_code == 404  # per user


async def test_cors_allows_the_pages_origin_and_the_configured_ones_only(
    make_app: AppFactory, api_port: int
) -> None:
    app = await make_app(
        api_port=api_port, reuse_port=True, allowed_origins=["https://app.example.com"]
    )
    asked = {
        "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "authorization",
    }
    async with httpx.AsyncClient(base_url=str(app.api_url), timeout=10) as http:
        for origin in (f"http://127.0.0.1:{app.port}", "https://app.example.com"):
            allowed = await http.options("/avatars/me/persona", headers={"Origin": origin, **asked})
            assert allowed.status_code == 200
            assert allowed.headers["access-control-allow-origin"] == origin
            assert "PATCH" in allowed.headers["access-control-allow-methods"]
        refused = await http.options(
            "/avatars/me/persona", headers={"Origin": "https://evil.example", **asked}
        )
        simple = await http.get("/personas", headers={"Origin": "https://evil.example"})
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers
    assert "access-control-allow-origin" not in simple.headers


async def test_openapi_and_docs_are_served(http: httpx.AsyncClient) -> None:
    schema = (await http.get("/openapi.json")).json()
    assert set(schema["paths"]) == {
        "/avatars/me",
        "/avatars",
        "/avatars/me/persona",
        "/personas",
        "/avatars/me/messages",
    }
    choice = schema["components"]["schemas"]["PersonaChoice"]
    # the catalogue is data, so the schema points to GET /personas rather than listing ids
    assert "GET /personas" in choice["properties"]["personality"]["description"]
    assert choice["additionalProperties"] is False
    docs = await http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


async def test_run_py_openapi_prints_the_schema() -> None:
    code, out, err = await run_py("openapi")
    assert code == 0, err
    schema = json.loads(out)
    assert schema["info"]["title"] == "Persona chat"
    assert "/avatars/me/persona" in schema["paths"]
    assert (ROOT / "run.py").is_file()


async def test_api_port_0_turns_the_api_off(make_app: AppFactory) -> None:
    app = await make_app(api_port=0)
    assert (app.api_port, app.api_url) == (None, None)


# ---------------------------------------------------------------- the seed's flow


async def test_patch_reaches_an_open_socket_and_its_next_reply(
    http: httpx.AsyncClient, connect: ClientFactory, user: str
) -> None:
    socket = await connect(user)
    await with_avatar(socket, "friendly")
    assert (await socket.request({"type": "chat", "text": "hello"}))["persona"] == "friendly"
    response = await http.patch(
        "/avatars/me/persona", json={"personality": "witty"}, headers=auth(user)
    )
    assert response.status_code == 200
    pushed = await socket.recv()
    assert pushed == {"type": "persona_changed", "personality": "witty", "previous": "friendly"}
    assert (await socket.request({"type": "chat", "text": "and now?"}))["persona"] == "witty"


async def test_after_the_200_a_chat_sent_at_once_uses_the_new_persona(
    http: httpx.AsyncClient, connect: ClientFactory, user: str
) -> None:
    """The sockets' cached avatars are dropped before the 200: a chat sent the moment it
    arrives, without waiting for the push, is rendered with the new persona."""
    sockets = [await connect(user) for _ in range(2)]
    await with_avatar(sockets[0], "friendly")
    for persona in ("witty", "caring", "playful", "romantic", "professional", "friendly"):
        for socket in sockets:  # both cache the avatar
            await chat(socket, "warm")
        response = await http.patch(
            "/avatars/me/persona", json={"personality": persona}, headers=auth(user)
        )
        assert response.status_code == 200
        replies = await asyncio.gather(*(chat(s, "which one?") for s in sockets))
        assert [r["persona"] for r in replies] == [persona, persona]


async def chat(socket: Client, text: str) -> dict[str, Any]:
    """A chat with an id of its own (two sockets of one user share the ids' space)."""
    frame_id = uuid.uuid4().hex
    await socket.send({"type": "chat", "id": frame_id, "text": text})
    while True:
        frame = await socket.recv()
        if frame.get("ref") == frame_id:
            return frame


# ---------------------------------------------------------------- authorization


async def test_no_user_reads_or_changes_another_users_avatar_or_messages(
    http: httpx.AsyncClient, connect: ClientFactory, user: str, database_url: str
) -> None:
    other = user + "-victim"
    victim: Client = await connect(other)
    await with_avatar(victim, "caring")
    secret_reply = await victim.request({"type": "chat", "text": "victim secret"})
    mine = auth(user)
    # nothing of the victim's is reachable with my token, whatever the request names
    assert (await http.get("/avatars/me", headers=mine)).status_code == 404
    assert (await http.get(f"/avatars/me?user_id={other}", headers=mine)).status_code == 404
    for before in (None, secret_reply["reply_id"] + 1):
        params: dict[str, Any] = {"user_id": other}
        if before is not None:
            params["before"] = before
        page = await http.get("/avatars/me/messages", params=params, headers=mine)
        assert (page.status_code, page.json()) == (200, {"messages": []})
    patched = await http.patch("/avatars/me/persona", json={"personality": "witty"}, headers=mine)
    assert patched.status_code == 404
    # my own avatar is mine alone
    await create(http, user, "playful")
    await http.patch("/avatars/me/persona", json={"personality": "romantic"}, headers=mine)
    assert await avatar_row(database_url, other) == ("caring", 1)
    assert await avatar_row(database_url, user) == ("romantic", 2)
    assert (await http.get("/avatars/me", headers=auth(other))).json()["personality"] == "caring"
