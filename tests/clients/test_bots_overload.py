"""The bots count a chat refused `overloaded` as the server shedding load, not as an error; the
link reads it as any other error."""

from __future__ import annotations

import orjson
from websockets.asyncio.server import ServerConnection, serve

from clients.bots.load import LoadConfig, run_load
from clients.bots.plan import BotPlan
from clients.link import decode
from protocol.frames import Error
from tests.clients.test_bots import TOKEN_FOR, StaleServer


class SheddingServer(StaleServer):
    """Refuses every other chat `overloaded` (503, with a retry hint); answers the rest with
    the persona it really has."""

    async def handle(self, ws: ServerConnection) -> None:
        current, chats = self.first, 0
        async for raw in ws:
            frame = orjson.loads(raw)
            if frame["type"] == "chat" and not str(frame.get("text", "")).startswith("/"):
                chats += 1
                if chats % 2:
                    refused = {"type": "error", "ref": frame.get("id"), "code": "overloaded"}
                    details = {"retry_after_ms": 1000}
                    await ws.send(
                        orjson.dumps(refused | {"status": 503, "details": details}).decode()
                    )
                    continue
            answer, current = self.answer(frame, current)
            if answer["type"] == "reply":
                answer["persona"] = current
            await ws.send(orjson.dumps(answer).decode())


async def test_bots_count_overloaded_chats_apart_from_errors() -> None:
    async with serve(SheddingServer().handle, "127.0.0.1", 0) as server:
        url = f"ws://127.0.0.1:{next(iter(server.sockets)).getsockname()[1]}/ws"
        config = LoadConfig(
            plan=BotPlan(url=url, switch_every=3), clients=2, duration_s=0.5, token_for=TOKEN_FOR
        )
        report = await run_load(config)
    totals = report["totals"]
    assert totals["overloaded"] > 0 and totals["replies"] > 0
    assert (report["errors"], totals["unexpected_errors"], report["ok"]) == ({}, 0, True)


def test_the_link_reads_an_overloaded_error_as_any_other_error() -> None:
    raw = orjson.dumps(
        {"type": "error", "ref": "c1", "code": "overloaded", "status": 503,
         "message": "the server is overloaded", "details": {"retry_after_ms": 1000}}
    )  # fmt: skip
    frame = decode(raw)
    assert isinstance(frame, Error)
    assert (frame.code, frame.status) == ("overloaded", 503)
    assert frame.details == {"retry_after_ms": 1000}
