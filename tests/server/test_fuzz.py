"""Fuzzing the decoder and a live connection: every frame answered, nothing crashes.

The suite runs 100,000 frames through the decoder (hypothesis draws the generator's seeds) and
5,000 over live connections (tests/server/test_bad_input.py also drives a live connection with
hypothesis-made frames); for the full count on the live path run:
FUZZ_LIVE_FRAMES=100000 python -m pytest tests/server/test_fuzz.py
"""

from __future__ import annotations

import asyncio
import os
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import BadJson, InvalidFrame
from protocol.frames import decode_client_frame
from tests.client import Client
from tests.conftest import AppFactory, ClientFactory
from tests.fuzzing import FrameFuzzer

DECODER_FRAMES = int(os.environ.get("FUZZ_FRAMES", "100000"))
LIVE_FRAMES = int(os.environ.get("FUZZ_LIVE_FRAMES", "5000"))
CONNECTIONS = 4
BATCH = 50


DECODER_BATCH = 1000


def test_decoder_accepts_or_rejects_every_generated_frame() -> None:
    """Hypothesis draws the seeds (and would shrink one that fails); each seed makes 1,000
    frames, so the run covers DECODER_FRAMES in all."""
    counts = {"accepted": 0, "rejected": 0}

    @settings(
        max_examples=max(1, DECODER_FRAMES // DECODER_BATCH), deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )  # fmt: skip
    @given(seed=st.integers(min_value=0, max_value=2**32 - 1))
    def batch(seed: int) -> None:
        fuzzer = FrameFuzzer(seed)
        for _ in range(DECODER_BATCH):
            try:
                decode_client_frame(fuzzer.frame())
                counts["accepted"] += 1
            except (BadJson, InvalidFrame):
                counts["rejected"] += 1

    batch()
    total = counts["accepted"] + counts["rejected"]
    print(f"\ndecoder fuzz: {total} frames, {counts['accepted']} accepted, "
          f"{counts['rejected']} rejected, 0 crashes")  # fmt: skip
    assert total >= DECODER_FRAMES
    assert counts["accepted"] > total // 20 and counts["rejected"] > total // 2


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
