"""A client that sends but never reads: bounded buffers, close 1008, no harm to the others."""

from __future__ import annotations

import asyncio
import statistics
import time

from server.app import App
from tests.client import Client
from tests.conftest import AppFactory, ClientFactory, with_avatar

OTHERS = 5
PINGS = 60


async def _ping_p99(clients: list[Client]) -> float:
    """p99 of ping round trips over all `clients`, pinging concurrently."""

    async def pings(client: Client) -> list[float]:
        seen = []
        for _ in range(PINGS):
            started = time.perf_counter()
            answer = await client.request({"type": "ping"})
            assert answer["type"] == "pong"
            seen.append(time.perf_counter() - started)
            await asyncio.sleep(0.005)
        return seen

    samples = [s for batch in await asyncio.gather(*(pings(c) for c in clients)) for s in batch]
    return statistics.quantiles(samples, n=100)[98]


def _closes(app: App, code: int) -> float:
    value = app.metrics.registry.get_sample_value("chat_closes_total", {"code": str(code)})
    return value or 0.0


async def test_client_that_never_reads_is_closed_1008_and_others_keep_their_latency(
    make_app: AppFactory, connect: ClientFactory
) -> None:
    app = await make_app(
        send_timeout_s=1.0,
        outbox_limit_bytes=256 * 1024,
        rate_per_s=200,
        rate_burst=200,
        history_bytes_per_s=10**9,  # the slow client's history is not what is limited here
    )
    others = [await connect(target=app) for _ in range(OTHERS)]
    slow = await connect(target=app)
    await with_avatar(slow)
    for index in range(10):  # big texts make every history answer about 40 KB
        await slow.request({"type": "chat", "text": f"{index} " + "x" * 3990})

    baseline = await _ping_p99(others)

    async def flood() -> None:
        for _ in range(400):
            await slow.send({"type": "history", "limit": 100})
            await asyncio.sleep(0.004)

    flooding = asyncio.create_task(flood())
    during = await _ping_p99(others)
    async with asyncio.timeout(15):
        while _closes(app, 1008) < 1:
            await asyncio.sleep(0.05)
    flooding.cancel()
    slow.conn.transport.abort()  # it never reads, so it cannot finish a closing handshake
    print(f"\nping p99 of {OTHERS} other clients: {baseline * 1000:.1f} ms without the slow "
          f"client, {during * 1000:.1f} ms with it")  # fmt: skip
    assert _closes(app, 1008) == 1
    assert during < max(5 * baseline, 0.25)
    assert (await others[0].request({"type": "ping"}))["type"] == "pong"
