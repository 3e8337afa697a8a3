"""Fuzzing the decoder and a live connection: every frame answered, nothing crashes.

The suite runs 100,000 frames through the decoder and 5,000 over live connections; for the
full count on the live path run:  FUZZ_LIVE_FRAMES=100000 python -m pytest tests/server/test_fuzz.py
"""

from __future__ import annotations

import asyncio
import os
import time

from protocol.errors import BadJson, InvalidFrame
from protocol.frames import decode_client_frame
from tests.client import Client
from tests.conftest import AppFactory, ClientFactory
from tests.fuzzing import FrameFuzzer

DECODER_FRAMES = int(os.environ.get("FUZZ_FRAMES", "100000"))
LIVE_FRAMES = int(os.environ.get("FUZZ_LIVE_FRAMES", "5000"))
CONNECTIONS = 4
BATCH = 50


def test_decoder_accepts_or_rejects_every_generated_frame() -> None:
    fuzzer = FrameFuzzer(seed=1)
    accepted = rejected = 0
    started = time.perf_counter()
    for _ in range(DECODER_FRAMES):
        try:
            decode_client_frame(fuzzer.frame())
            accepted += 1
        except (BadJson, InvalidFrame):
            rejected += 1
    elapsed = time.perf_counter() - started
    print(f"\ndecoder fuzz: {DECODER_FRAMES} frames, {accepted} accepted, {rejected} rejected, "
          f"0 crashes, {elapsed:.1f} s")  # fmt: skip
    assert accepted + rejected == DECODER_FRAMES
    assert accepted > DECODER_FRAMES // 20 and rejected > DECODER_FRAMES // 2


async def _fuzz_connection(client: Client, seed: int, frames: int) -> tuple[int, int]:
    """Send `frames` fuzz frames in batches, each closed by a ping; return (sent, answered)."""
    fuzzer = FrameFuzzer(seed)
    sent = answered = cancels = 0
    for batch in range(0, frames, BATCH):
        for _ in range(min(BATCH, frames - batch)):
            raw = fuzzer.frame()
            cancels += '"cancel"' in raw
            await client.send_raw(raw)
            sent += 1
        marker = f"sync-{batch}"
        await client.send({"type": "ping", "id": marker})
        while True:
            answer = await client.recv(timeout=30)
            if answer.get("ref") == marker and answer["type"] == "pong":
                break
            if answer["type"] not in ("reply_delta", "persona_changed"):
                answered += 1
    assert answered >= sent - cancels, (sent, answered, cancels)
    return sent, answered


async def test_live_connections_answer_every_generated_frame(
    make_app: AppFactory, connect: ClientFactory
) -> None:
    app = await make_app(rate_per_s=1e6, rate_burst=10**6)
    clients = [await connect(target=app) for _ in range(CONNECTIONS)]
    started = time.perf_counter()
    results = await asyncio.gather(
        *(_fuzz_connection(c, seed, LIVE_FRAMES // CONNECTIONS) for seed, c in enumerate(clients))
    )
    elapsed = time.perf_counter() - started
    sent = sum(r[0] for r in results)
    print(f"\nlive fuzz: {sent} frames over {CONNECTIONS} connections, "
          f"{sum(r[1] for r in results)} answers, 0 crashes, {elapsed:.1f} s")  # fmt: skip
    assert sent == LIVE_FRAMES // CONNECTIONS * CONNECTIONS
    for client in clients:
        assert (await client.request({"type": "ping"}))["type"] == "pong"


async def test_invalid_utf8_text_frame_closes_only_that_connection(
    connect: ClientFactory,
) -> None:
    bystander = await connect()
    victim = await connect()
    await victim.conn.send(b'{"type":"chat","text":"\xff\xfe"}', text=True)
    await victim.conn.wait_closed()
    assert victim.conn.close_code == 1007
    assert (await bystander.request({"type": "ping"}))["type"] == "pong"
