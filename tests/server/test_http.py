"""Plain HTTP on the WebSocket port: health, readiness and metrics."""

from __future__ import annotations

import httpx

from server.app import App
from tests.conftest import ClientFactory, with_avatar


async def get(app: App, path: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as http:
        return await http.get(f"http://127.0.0.1:{app.port}{path}")


async def test_healthz_is_200(app: App) -> None:
    response = await get(app, "/healthz")
    assert (response.status_code, response.text) == (200, "ok\n")


async def test_readyz_is_200_while_the_database_answers(app: App) -> None:
    response = await get(app, "/readyz")
    assert (response.status_code, response.text) == (200, "ready\n")


async def test_unknown_path_is_404(app: App) -> None:
    assert (await get(app, "/nope")).status_code == 404


async def test_metrics_count_frames_errors_switches_and_latency(
    app: App, connect: ClientFactory
) -> None:
    client = await connect()
    await with_avatar(client, "friendly")
    await client.request({"type": "set_persona", "personality": "witty"})
    await client.request({"type": "chat", "text": "count me"})
    await client.request({"type": "set_persona", "personality": "nope"})
    response = await get(app, "/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=")
    lines = set(response.text.splitlines())
    for expected in (
        "chat_connections_open 1.0",
        "chat_sessions_authenticated 1.0",
        'chat_frames_received_total{type="chat"} 1.0',
        'chat_frames_received_total{type="set_persona"} 2.0',
        'chat_errors_total{code="invalid_persona"} 1.0',
        "chat_persona_switches_total 1.0",
        "chat_reply_latency_seconds_count 1.0",
        'chat_replies_total{status="completed"} 1.0',
    ):
        assert expected in lines, expected
    assert any(line.startswith("chat_db_pool_in_use ") for line in lines)
