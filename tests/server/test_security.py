"""The holes an attacker found (issue #17), each closed, against a real server: one address's
pre-auth sockets, DNS rebinding, history as an amplifier, repeated headers, retried ids, refs
of half-broken frames; and no client input, fuzzers and attacks together, logs a traceback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import orjson
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from server.app import App
from server.auth import mint_token
from tests.client import Client
from tests.conftest import SECRET, AppFactory, ClientFactory, with_avatar
from tests.fuzzing import FrameFuzzer


async def raw_http(app: App, request: bytes, timeout: float = 10.0, eof: bool = False) -> int:
    """Send `request` as it is (then end the stream, with `eof`), and return the HTTP status of
    the answer (0 if none)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    try:
        writer.write(request)
        if eof:
            writer.write_eof()
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
        await writer.wait_closed()
    parts = line.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def upgrade(app: App, *headers: str, path: str = "/ws") -> bytes:
    """A WebSocket upgrade request with these header lines (Host included by the caller)."""
    lines = [
        f"GET {path} HTTP/1.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


async def until(condition: object, what: str) -> None:
    """Wait (bounded) until `condition()` holds: for state the server reaches on its own."""
    assert callable(condition)
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


# ---------------------------------------------------------------- one address cannot lock out all


async def test_an_address_holding_its_preauth_allowance_does_not_lock_out_another(
    make_app: AppFactory,
) -> None:
    app = await make_app(max_preauth_per_ip=3, hello_timeout_s=30)
    async with AsyncExitStack() as silent:
        for _ in range(3):  # never say hello
            await silent.enter_async_context(ws_connect(app.url, compression=None))
        await until(lambda: app.services.state.admission.preauth == 3, "three counted")
        with pytest.raises(InvalidStatus) as refused:
            async with ws_connect(app.url, compression=None):
                pass
        assert refused.value.response.status_code == 429
        assert b"from your address" in refused.value.response.body
        # another address on this machine still gets in and chats
        async with ws_connect(app.url, compression=None, local_addr=("127.0.0.2", 0)) as other:
            await other.send(f'{{"type": "hello", "token": "{mint_token(SECRET, "o2")}"}}')
            assert orjson.loads(await other.recv())["type"] == "welcome"
            await other.send('{"type": "create_avatar", "name": "Ava", "personality": "witty"}')
            assert orjson.loads(await other.recv())["type"] == "avatar"
            await other.send('{"type": "chat", "id": "c", "text": "hi there"}')
            reply = orjson.loads(await other.recv())
            assert (reply["type"], reply["ref"], reply["persona"]) == ("reply", "c", "witty")


async def test_a_hello_too_large_is_refused_saying_so(app: App) -> None:
    async with Client(app.url) as client:
        await client.send({"type": "hello", "token": "x" * 9000})
        with pytest.raises(ConnectionClosed):
            await client.recv()
    assert client.conn.close_code == 4401
    reason = client.conn.close_reason or ""
    assert reason.startswith("invalid hello: token: String should have at most")


# ---------------------------------------------------------------- DNS rebinding


async def test_a_rebinding_host_gets_no_dev_token(make_app: AppFactory) -> None:
    app = await make_app(database_url=None)
    for host in (f"rebind.example:{app.port}", "rebind.example", "127.0.0.1.nip.io"):
        request = f"GET /dev/token?user=alice HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        assert await raw_http(app, request) == 403, host
    for host in (f"localhost:{app.port}", f"127.0.0.1:{app.port}", f"[::1]:{app.port}"):
        request = f"GET /dev/token?user=alice HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        assert await raw_http(app, request) == 200, host


async def test_a_rebinding_host_and_its_own_origin_cannot_open_the_socket(app: App) -> None:
    rebound = upgrade(
        app, f"Host: rebind.example:{app.port}", f"Origin: http://rebind.example:{app.port}"
    )
    assert await raw_http(app, rebound) == 403
    own = upgrade(app, f"Host: localhost:{app.port}", f"Origin: http://localhost:{app.port}")
    assert await raw_http(app, own) == 101


async def test_a_public_name_is_its_own_origin_when_not_bound_to_loopback(
    make_app: AppFactory,
) -> None:
    app = await make_app(host="0.0.0.0")  # behind a proxy that passes Host through
    request = upgrade(app, "Host: chat.example.org", "Origin: https://chat.example.org")
    assert await raw_http(app, request) == 101
    malformed = upgrade(app, "Host: [::1", "Origin: http://[::1")
    assert await raw_http(app, malformed) == 403


# ---------------------------------------------------------------- repeated headers


@pytest.mark.parametrize("header", ["Host", "Origin"])
async def test_a_repeated_header_is_400_without_a_traceback(
    app: App, header: str, caplog: pytest.LogCaptureFixture
) -> None:
    value = f"127.0.0.1:{app.port}" if header == "Host" else f"http://127.0.0.1:{app.port}"
    own = f"Host: 127.0.0.1:{app.port}" if header == "Origin" else ""
    lines = [f"{header}: {value}", f"{header}: {value}", *([own] if own else [])]
    with caplog.at_level(logging.INFO):
        assert await raw_http(app, upgrade(app, *lines)) == 400
        assert await raw_http(app, upgrade(app, *lines, path="/dev/token")) in (400, 404)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert any(f"repeated {header} header" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- history as an amplifier


async def test_history_past_the_users_byte_budget_is_rate_limited_for_all_their_connections(
    make_app: AppFactory, connect: ClientFactory, user: str
) -> None:
    app = await make_app(history_bytes_per_s=1024, history_burst_bytes=64 * 1024)
    first = await connect(user, target=app)
    second = await connect(user, target=app)
    await with_avatar(first)
    reply = await first.request({"type": "chat", "text": "long words " * 350})
    assert reply["type"] == "reply"
    answers = []
    for index in range(20):  # about 4 KiB a page: the 64 KiB saved up last 16 pages
        conn = (first, second)[index % 2]
        answers.append(await conn.request({"type": "history", "limit": 100}))
        if answers[-1]["type"] == "error":
            break
    assert len(answers) >= 10
    assert [a["type"] for a in answers[:-1]] == ["history"] * (len(answers) - 1)
    limited = answers[-1]
    assert (limited["type"], limited["code"], limited["status"]) == ("error", "rate_limited", 429)
    assert limited["details"]["history_bytes_per_s"] == 1024
    assert limited["details"]["retry_after_ms"] >= 1
    for conn in (first, second):  # the budget is the user's, whichever connection asks
        assert (await conn.request({"type": "history"}))["code"] == "rate_limited"
    # another user's budget is their own, and chats are not history
    other = await connect(target=app)
    assert (await other.request({"type": "history"}))["type"] == "history"
    assert (await first.request({"type": "chat", "text": "still here?"}))["type"] == "reply"


# ---------------------------------------------------------------- retried ids, salvaged refs


async def test_a_retried_chat_id_is_answered_from_storage_without_rewriting_a_batch(
    connect: ClientFactory, user: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = await connect(user)
    await with_avatar(first)
    await first.send({"type": "chat", "id": "retry-1", "text": "are you there?"})
    original = await first.recv_type("reply")
    with caplog.at_level(logging.DEBUG, logger="server"):
        again = await connect(user)  # a reconnect: a new session, which has not seen the chat
        for conn in (first, again):
            await conn.send({"type": "chat", "id": "retry-1", "text": "are you there?"})
            replayed = await conn.recv_type("reply")
            assert replayed["replayed"] is True
            assert replayed["reply_id"] == original["reply_id"]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("is a retry of a stored one" in m for m in messages) == 2  # once per retry
    assert not [m for m in messages if "met a stored chat" in m]  # no batch failed for them
    assert not [
        r for r in caplog.records if r.levelno > logging.DEBUG and "retry" in r.getMessage()
    ]


@pytest.mark.parametrize(
    "raw",
    [
        '{"type": "chat", "id": "k1", "text": "\\ud800"}',  # a lone surrogate
        '{"type": "history", "id": "k1", "limit": NaN}',  # not JSON, but readable
        '{"type": "chat", "id": "k1", "text": 5}',
        '{"type": "nope", "id": "k1"}',
    ],
)
async def test_a_frame_with_a_readable_id_keeps_its_ref(connect: ClientFactory, raw: str) -> None:
    client = await connect()
    await client.send_raw(raw)
    answer = await client.recv()
    assert (answer["type"], answer["ref"]) == ("error", "k1")


# ---------------------------------------------------------------- no traceback, whatever comes


@pytest.fixture
async def attacked(make_app: AppFactory) -> AsyncIterator[App]:
    yield await make_app(hello_timeout_s=0.5, rate_per_s=1e6, rate_burst=10**6)


HOSTILE_REQUESTS = [
    b"GET /ws HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET /ws HTTP/1.1\r\n\r\n",  # no Host
    b"GET / HTTP/1.0\r\n\r\n",
    b"POST /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
    b"BREW /pot HTCPCP/1.0\r\n\r\n",
    b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: [::1\r\nOrigin: http://[::1\r\n\r\n",
    b"GET /dev/token?user=%00 HTTP/1.1\r\nHost: 127.0.0.1:99999\r\n\r\n",
    b"GET /static/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: a\r\nSec-WebSocket-Key: b\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: \xff\xfe\r\nX-Forwarded-For: ::::, \x00\r\n\r\n",
]
UNFINISHED_REQUESTS = [
    b"GET /ws HTTP/1.1\r\nHost: x\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS hello
]


async def test_no_client_input_logs_a_traceback_or_an_error(
    attacked: App, caplog: pytest.LogCaptureFixture
) -> None:
    app = attacked
    with caplog.at_level(logging.INFO):
        statuses = [await raw_http(app, request) for request in HOSTILE_REQUESTS]
        for request in UNFINISHED_REQUESTS:
            assert await raw_http(app, request, eof=True) == 0
        async with AsyncExitStack() as stack:
            # silent sockets: one says nothing, one starts a handshake and stops
            await stack.enter_async_context(ws_connect(app.url, compression=None))
            _, half = await asyncio.open_connection("127.0.0.1", app.port)
            half.write(b"GET /ws HTTP/1.1\r\n")
            for frame in ("not json", "{}", '{"type":"hello"}', '{"type":"hello","token":5}'):
                async with Client(app.url) as client:
                    await client.send_raw(frame)
                    await client.conn.wait_closed()
            for binary in (b"\x00\x01", '{"type":"chat","text":"\xff"}'.encode("latin-1")):
                async with Client(app.url) as client:
                    await client.conn.send(binary, text=True)
                    await client.conn.wait_closed()
            fuzzed = await _fuzz(app)
            half.close()
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [f"{r.levelname} {r.name}: {r.getMessage()}" for r in bad]
    assert fuzzed >= 1000
    assert all(status >= 400 or status in (0, 200) for status in statuses), statuses
    assert statuses[:3] == [400, 426, 200]


async def _fuzz(app: App) -> int:
    """Hostile frames on authenticated connections; return how many were sent."""
    sent = 0
    for seed in range(2):
        client = Client(app.url)
        await client.__aenter__()
        try:
            await client.hello(mint_token(SECRET, f"fuzzed-{seed}"))
            await with_avatar(client)
            fuzzer = FrameFuzzer(seed)
            for _ in range(600):
                await client.send_raw(fuzzer.frame())
                sent += 1
            await _drain(client.conn)
        finally:
            await client.__aexit__(None, None, None)
    return sent


async def _drain(conn: ClientConnection) -> None:
    """Read answers until a ping's pong, so that every fuzzed frame was handled."""
    await conn.send('{"type": "ping", "id": "last"}')
    while True:
        frame = orjson.loads(await asyncio.wait_for(conn.recv(), 30))
        if frame.get("ref") == "last" and frame["type"] == "pong":
            return
