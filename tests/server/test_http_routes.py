"""The HTTP side of the port: the page, its static files, the dev-token rule, the Origin check."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from server.app import App, dev_token_enabled
from server.settings import Settings
from tests.client import Client
from tests.conftest import SECRET, AppFactory


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    headers: dict[str, str]
    body: bytes


async def http_get(app: App, path: str) -> HttpAnswer:
    """A raw HTTP/1.1 GET, so that the path reaches the server exactly as written."""
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    try:
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{app.port}\r\nConnection: close\r\n\r\n"
        writer.write(request.encode("ascii"))
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return HttpAnswer(int(status_line.split()[1]), headers, body)


async def handshake_status(app: App, origin: str | None) -> int:
    """101 when the WebSocket handshake with this Origin succeeds, else the HTTP status."""
    try:
        async with connect(app.url, origin=Origin(origin) if origin else None, compression=None):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


# ---------------------------------------------------------------------------- the dev token


async def test_dev_token_answers_json_with_user_and_token(make_app: AppFactory) -> None:
    app = await make_app(database_url=None)
    answer = await http_get(app, "/dev/token?user=alice")
    assert answer.status == 200
    assert answer.headers["content-type"] == "application/json"
    body = orjson.loads(answer.body)
    assert sorted(body) == ["token", "user"]
    assert body["user"] == "alice"


async def test_dev_token_signs_in_as_the_named_user(make_app: AppFactory) -> None:
    app = await make_app(database_url=None)
    token = orjson.loads((await http_get(app, "/dev/token?user=bob%20b")).body)["token"]
    async with Client(app.url) as client:
        welcome = await client.hello(token)
    assert (welcome["type"], welcome["user_id"]) == ("welcome", "bob b")


async def test_dev_token_without_a_user_is_400(make_app: AppFactory) -> None:
    app = await make_app(database_url=None)
    assert (await http_get(app, "/dev/token")).status == 400


async def test_dev_token_is_404_with_database_url_and_jwt_secret(
    make_app: AppFactory, database_url: str
) -> None:
    app = await make_app(database_url=database_url, jwt_secret=SECRET)
    answer = await http_get(app, "/dev/token?user=alice")
    assert answer.status == 404
    assert b"token" not in answer.body


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_dev_token_is_enabled_on_loopback_with_the_embedded_database(host: str) -> None:
    assert dev_token_enabled(Settings(host=host, database_url=None)) is True


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.org"])
def test_dev_token_is_disabled_when_bound_elsewhere(host: str) -> None:
    assert dev_token_enabled(Settings(host=host, database_url=None)) is False


def test_dev_token_is_disabled_with_an_external_database() -> None:
    settings = Settings(host="127.0.0.1", database_url="postgresql://db.example/chat")
    assert dev_token_enabled(settings) is False


# ---------------------------------------------------------------------------- the Origin check


async def test_same_origin_handshake_is_allowed(app: App) -> None:
    assert await handshake_status(app, f"http://127.0.0.1:{app.port}") == 101


async def test_allow_listed_origin_handshake_is_allowed(make_app: AppFactory) -> None:
    app = await make_app(allowed_origins=["https://chat.example.org"])
    assert await handshake_status(app, "https://chat.example.org") == 101


async def test_other_origin_handshake_is_refused_with_403(app: App) -> None:
    assert await handshake_status(app, "https://evil.example.com") == 403


async def test_same_host_on_another_port_is_another_origin(app: App) -> None:
    assert await handshake_status(app, f"http://127.0.0.1:{app.port + 1}") == 403


async def test_handshake_without_origin_is_allowed(app: App) -> None:
    assert await handshake_status(app, None) == 101


# ---------------------------------------------------------------------------- the page


async def test_root_serves_the_chat_page(app: App) -> None:
    answer = await http_get(app, "/")
    assert answer.status == 200
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    assert b'<script type="module" src="/static/app.js"></script>' in answer.body


@pytest.mark.parametrize(
    ("name", "content_type"),
    [("app.js", "text/javascript; charset=utf-8"), ("style.css", "text/css; charset=utf-8")],
)
async def test_static_files_are_served_with_their_type(
    app: App, name: str, content_type: str
) -> None:
    answer = await http_get(app, f"/static/{name}")
    assert (answer.status, answer.headers["content-type"]) == (200, content_type)
    assert int(answer.headers["content-length"]) == len(answer.body) > 0


@pytest.mark.parametrize(
    "path",
    [
        "/static/../app.py",
        "/static/..%2fapp.py",
        "/static/%2e%2e/app.py",
        "/static/../../run.py",
        "/static//etc/passwd",
        "/static/__init__.py",
        "/static/.hidden",
        "/static/",
        "/static/nope.js",
        "/static/..\\app.py",
    ],
)
async def test_static_refuses_paths_outside_its_files(app: App, path: str) -> None:
    answer = await http_get(app, path)
    assert answer.status == 404
    assert answer.body == b"not found\n"
