"""The time-to-first-token this server adds over an OpenAI-compatible endpoint (a local fake)."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.procs import Cores, Proc
from bench.tokens import signer
from clients.link import Frame, Link
from clients.loop import run_async
from tests.server.fake_llm import FakeLLM, Script

TOKENS = tuple(f" word{i}" for i in range(16))
SECRET = secrets.token_urlsafe(48)
sign = signer(SECRET)
RECV_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Sample:
    """One chat's timings, in seconds."""

    request: float  # the fake got the request - the client sent the chat
    first_token: float  # the client read the first reply_delta - the fake wrote the first token


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.llm_ttft", description=__doc__)
    parser.add_argument("--chats", type=int, default=300, help="measured chats (default 300)")
    parser.add_argument("--warmup", type=int, default=20, help="chats before measuring")
    parser.add_argument("--first-token-ms", type=float, default=10.0, help="the fake's prefill")
    parser.add_argument("--token-ms", type=float, default=2.0, help="between the fake's tokens")
    parser.add_argument(
        "--delta-flush-ms",
        type=float,
        default=None,
        help="the server's delta_flush_ms (default: the server's own default)",
    )
    return parser.parse_args(argv)


def start_server(workdir: Path, fake_url: str, cores: Cores, flush_ms: float | None) -> Proc:
    data = workdir / "data"
    argv = [sys.executable, "run.py", "serve", "--port", "0", "--data-dir", str(data)]
    argv += ["--log-level", "WARNING", "--generator", "openai", "--llm-base-url", fake_url]
    env = {"CHAT_JWT_SECRET": SECRET}
    if flush_ms is not None:
        env["CHAT_DELTA_FLUSH_MS"] = str(flush_ms)
    return Proc("chat", argv, workdir, cores.server, env, pgdata=data / "pgdata")


async def one_chat(link: Link, fake: FakeLLM, number: int) -> Sample | None:
    """Chat once; None when the reply came without any `reply_delta`."""
    ref = f"b{number}"
    text = f"chat {number}: how was your day?"
    delta_at: float | None = None

    def on_other(frame: Frame) -> None:
        nonlocal delta_at
        if frame.get("ref") == ref and frame.get("type") == "reply_delta":
            delta_at = delta_at or time.perf_counter()

    sent_at = time.perf_counter()
    chat = {"type": "chat", "id": ref, "text": text}
    frame = await link.request(chat, timeout=RECV_TIMEOUT_S, on_other=on_other)
    if frame["type"] != "reply" or frame["status"] != "completed":
        raise RuntimeError(f"chat {number} failed: {frame}")
    request = fake.requests[-1]
    assert request.messages[-2]["content"] == text, "the fake answered another chat"
    if delta_at is None or request.first_token_at is None:
        return None
    return Sample(request.arrived_at - sent_at, delta_at - request.first_token_at)


async def measure(args: argparse.Namespace, workdir: Path, cores: Cores) -> list[Sample]:
    script = Script(
        tokens=TOKENS,
        first_token_delay_s=args.first_token_ms / 1000,
        token_delay_s=args.token_ms / 1000,
    )
    async with FakeLLM(script) as fake:
        server = await asyncio.to_thread(
            start_server, workdir, fake.url, cores, args.delta_flush_ms
        )
        try:
            async with await Link.open(server.url) as link:
                hello = {"type": "hello", "token": sign("ttft-bench")}
                welcome = await link.request(hello, timeout=RECV_TIMEOUT_S)
                assert welcome["type"] == "welcome", welcome
                create = {"type": "create_avatar", "name": "Bench", "personality": "friendly"}
                answer = await link.request(create, timeout=RECV_TIMEOUT_S)
                assert answer["type"] == "avatar", answer
                samples = []
                for number in range(args.warmup + args.chats):
                    sample = await one_chat(link, fake, number)
                    if number >= args.warmup and sample is not None:
                        samples.append(sample)
                return samples
        finally:
            await asyncio.to_thread(server.stop)


def percentiles(values: list[float]) -> str:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    ms = [v * 1000 for v in (cuts[49], cuts[98], max(values), statistics.fmean(values))]
    return "p50 {:7.3f} ms   p99 {:7.3f} ms   max {:7.3f} ms   mean {:7.3f} ms".format(*ms)


def report(args: argparse.Namespace, samples: list[Sample], cores: Cores) -> None:
    flush = "server default" if args.delta_flush_ms is None else f"{args.delta_flush_ms:g} ms"
    print(
        f"{len(samples)} chats measured (after {args.warmup} warm-up), one at a time; "
        f"delta flush: {flush}; the fake: first token after {args.first_token_ms:g} ms, "
        f"then {len(TOKENS) - 1} more {args.token_ms:g} ms apart"
    )
    print(f"cores: {cores.describe()}")
    print("TTFT overhead (client reads the first reply_delta - the fake writes the first token):")
    print("  " + percentiles([s.first_token for s in samples]))
    print("request overhead (the fake reads the request - the client sends the chat):")
    print("  " + percentiles([s.request for s in samples]))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.chats < 2:
        raise SystemExit("--chats must be at least 2")
    cores = Cores.plan()
    if cores.client is not None:
        os.sched_setaffinity(0, cores.client)
    with tempfile.TemporaryDirectory(prefix="llm-ttft-") as workdir:
        samples = run_async(measure(args, Path(workdir), cores))
    if len(samples) < 2:
        raise SystemExit(f"only {len(samples)} chats streamed a reply_delta; nothing to report")
    report(args, samples, cores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
