"""`python -m bench.http_switch`: from a `PATCH /avatars/me/persona` answered by one worker of
`serve --workers 2` to the `persona_changed` on a socket that the other worker holds.

The benchmark starts the server on an embedded PostgreSQL of its own, opens sockets of one user
until each worker holds one and kept-alive HTTP connections until each worker serves one (which
worker holds a connection is read from the workers' sockets with psutil), then switches the
persona over HTTP through each worker in turn, timing the other worker's push from the PATCH's
200 and from the moment the PATCH was sent. Every socket must be told, and the next reply on the
other worker's socket must be in the new persona.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.procs import Proc
from bench.run import SERVER_ENV
from bench.tokens import signer
from clients.link import Link
from clients.loop import run_async

PERSONAS = ("witty", "caring", "playful", "romantic", "professional", "friendly")
TRIES = 40  # connections opened at most to find one on each worker


def hold_port() -> socket.socket:
    """A free port, held (bound, not listening, SO_REUSEPORT) while the workers bind it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def start(workdir: Path, secret: str, api_port: int) -> Proc:
    argv = [sys.executable, "run.py", "serve", "--workers", "2", "--port", "0"]
    argv += ["--api-port", str(api_port), "--data-dir", str(workdir / "data")]
    argv += ["--log-level", "WARNING"]
    env = {"CHAT_JWT_SECRET": secret, **SERVER_ENV}
    return Proc("workers-2", argv, workdir, None, env, pgdata=workdir / "data" / "pgdata")


def workers(proc: Proc) -> list[psutil.Process]:
    return [c for c in psutil.Process(proc.pid).children() if "--worker" in c.cmdline()]


def worker_of(local_port: int, pool: list[psutil.Process]) -> int:
    """The pid of the worker holding the other end of a connection from `local_port`."""
    for worker in pool:
        for connection in worker.net_connections(kind="tcp"):
            if connection.raddr and connection.raddr.port == local_port:
                return worker.pid
    raise RuntimeError(f"no worker holds a connection from port {local_port}")


async def chat(link: Link, text: str) -> dict[str, Any]:
    frame_id = uuid.uuid4().hex  # the user's sockets share the chat ids' space
    await link.send({"type": "chat", "id": frame_id, "text": text})
    while True:
        frame = await link.recv(10)
        if frame.get("ref") == frame_id:
            return frame


async def pushed(link: Link) -> tuple[dict[str, Any], float]:
    while True:
        frame = await link.recv(10)
        if frame.get("type") == "persona_changed":
            return frame, time.perf_counter()


async def measure(proc: Proc, secret: str, api_port: int, switches: int) -> dict[str, list[float]]:
    pool = workers(proc)
    if len(pool) != 2:
        raise RuntimeError(f"{len(pool)} workers, not 2")
    token = signer(secret)("bench-http-user")
    headers = {"Authorization": f"Bearer {token}"}
    links: dict[int, Link] = {}
    spare: list[Link] = []
    clients: dict[int, httpx.AsyncClient] = {}
    try:
        for _ in range(TRIES):
            link = await Link.open(proc.url)
            welcome = await link.request({"type": "hello", "token": token})
            assert welcome["type"] == "welcome", welcome
            pid = worker_of(link.ws.local_address[1], pool)
            if pid in links:
                spare.append(link)
            else:
                links[pid] = link
            if len(links) == 2:
                break
        for _ in range(TRIES):
            client = httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{api_port}",
                timeout=10,
                limits=httpx.Limits(max_connections=1),
            )
            response = await client.get("/avatars/me", headers=headers)
            local = response.extensions["network_stream"].get_extra_info("client_addr")
            pid = worker_of(local[1], pool)
            if pid in clients:
                await client.aclose()
            else:
                clients[pid] = client
            if len(clients) == 2:
                break
        if len(links) < 2 or len(clients) < 2:
            raise RuntimeError("the connections did not reach both workers")
        first = next(iter(links.values()))
        await first.request({"type": "create_avatar", "name": "Ava", "personality": "friendly"})
        for link in links.values():
            await chat(link, "hello")
        after_200: list[float] = []
        after_send: list[float] = []
        pids = list(clients)
        for index in range(switches):
            via, other = pids[index % 2], pids[(index + 1) % 2]
            persona = PERSONAS[index % len(PERSONAS)]
            pushes = {pid: asyncio.create_task(pushed(link)) for pid, link in links.items()}
            sent_at = time.perf_counter()
            response = await clients[via].patch(
                "/avatars/me/persona", json={"personality": persona}, headers=headers
            )
            answered_at = time.perf_counter()
            if response.status_code != 200:
                raise RuntimeError(f"PATCH answered {response.status_code}: {response.text}")
            await asyncio.gather(*pushes.values())
            frame, pushed_at = pushes[other].result()
            if frame["personality"] != persona:
                raise RuntimeError(f"pushed {frame}, not {persona}")
            after_200.append(pushed_at - answered_at)
            after_send.append(pushed_at - sent_at)
            reply = await chat(links[other], "which one?")
            if reply.get("persona") != persona:
                raise RuntimeError(f"stale render: {reply} after a switch to {persona}")
        return {"after_200": after_200, "after_send": after_send}
    finally:
        for client in clients.values():
            await client.aclose()
        for link in [*links.values(), *spare]:
            await link.close()


def quantiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered) * 1000, ordered[int(0.99 * (len(ordered) - 1))] * 1000


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http_switch", description=__doc__)
    parser.add_argument("--switches", type=int, default=500)
    args = parser.parse_args()
    secret = secrets.token_urlsafe(32)
    workdir = Path(tempfile.mkdtemp(prefix="persona-http-switch-"))
    holder = hold_port()
    api_port = holder.getsockname()[1]
    try:
        proc = start(workdir, secret, api_port)
        try:
            result = run_async(measure(proc, secret, api_port, args.switches))
        finally:
            proc.stop()
    finally:
        holder.close()
        shutil.rmtree(workdir, ignore_errors=True)
    p50, p99 = quantiles(result["after_200"])
    s50, s99 = quantiles(result["after_send"])
    print(f"serve --workers 2, {args.switches} PATCH /avatars/me/persona, alternating workers, "
          "0 stale replies")  # fmt: skip
    print(f"persona_changed on the other worker's socket, after the PATCH's 200: "
          f"p50 {p50:.2f} ms, p99 {p99:.2f} ms (negative: the push came first)")  # fmt: skip
    print(f"                                          after the PATCH was sent: "
          f"p50 {s50:.2f} ms, p99 {s99:.2f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
