"""The HTTP API across processes: a PATCH answered by one process reaches the sockets that
another holds (two `run.py serve` on one PostgreSQL, and `serve --workers 2`)."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil

from server.auth import mint_token
from tests.client import Client, login
from tests.conftest import SECRET, with_avatar
from tests.processes import Served, clean_env, serve

PERSONAS = ("witty", "caring", "playful", "romantic", "professional", "friendly")


def env_for(database_url: str) -> dict[str, str]:
    return clean_env(
        DATABASE_URL=database_url,
        CHAT_JWT_SECRET=SECRET,
        CHAT_REUSE_PORT="true",  # beside the test's holder of the API port
        CHAT_RATE_PER_S="100000",
        CHAT_RATE_BURST="100000",
    )


def auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SECRET, user)}"}


async def chat(socket: Client, text: str) -> dict[str, Any]:
    """A chat with an id of its own (the sockets of one user share the ids' space)."""
    frame_id = uuid.uuid4().hex
    await socket.send({"type": "chat", "id": frame_id, "text": text})
    while True:
        frame = await socket.recv()
        if frame.get("ref") == frame_id:
            return frame


async def pushed(socket: Client) -> tuple[dict[str, Any], float]:
    frame = await socket.recv_type("persona_changed")
    return frame, time.perf_counter()


def quantiles_ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[int(0.99 * (len(ordered) - 1))]
    return f"p50 {statistics.median(ordered) * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms"


async def test_patch_on_one_process_reaches_the_socket_on_another(
    database_url: str, tmp_path: Path, api_port: int
) -> None:
    """The seed's flow over two processes: a socket chatting on A, the PATCH answered by B,
    A's socket told with persona_changed, and its next reply in the new persona."""
    env = env_for(database_url)
    on_a = await serve(log_path=tmp_path / "a.log", env=env)
    on_b = await serve("--api-port", str(api_port), log_path=tmp_path / "b.log", env=env)
    user = f"http-{uuid.uuid4().hex[:10]}"
    try:
        socket = await login(on_a.url, SECRET, user)
        await with_avatar(socket, "friendly")
        assert (await chat(socket, "hello"))["persona"] == "friendly"
        after_200 = []
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=10) as b:
            previous = "friendly"
            for persona in PERSONAS * 5:
                push = asyncio.create_task(pushed(socket))
                response = await b.patch(
                    "/avatars/me/persona", json={"personality": persona}, headers=auth(user)
                )
                answered_at = time.perf_counter()
                assert response.status_code == 200, response.text
                frame, pushed_at = await push
                after_200.append(pushed_at - answered_at)
                assert frame == {
                    "type": "persona_changed",
                    "personality": persona,
                    "previous": previous,
                }
                assert (await chat(socket, "which one?"))["persona"] == persona
                previous = persona
        print(f"\npersona_changed on A after B's 200, {len(after_200)} PATCHes: "
              f"{quantiles_ms(after_200)}")  # fmt: skip
        await socket.__aexit__(None, None, None)
    finally:
        assert await on_a.stop() == 0
        assert await on_b.stop() == 0


def _workers(served: Served) -> list[psutil.Process]:
    return [c for c in psutil.Process(served.pid).children() if "--worker" in c.cmdline()]


def _worker_of(local_port: int, workers: list[psutil.Process]) -> int:
    """The pid of the worker that holds the other end of a connection from `local_port`."""
    for worker in workers:
        for connection in worker.net_connections(kind="tcp"):
            if connection.raddr and connection.raddr.port == local_port:
                return worker.pid
    raise AssertionError(f"no worker holds a connection from port {local_port}")


async def test_patch_under_two_workers_reaches_the_sockets_of_both(
    database_url: str, tmp_path: Path, api_port: int
) -> None:
    """`serve --workers 2`: the API on one shared port in both workers; a PATCH answered by
    either worker reaches the sockets on both, and their next replies use the new persona."""
    served = await serve(
        "--workers", "2", "--api-port", str(api_port), log_path=tmp_path / "w.log",
        env=env_for(database_url),
    )  # fmt: skip
    user = f"http-{uuid.uuid4().hex[:10]}"
    sockets: dict[int, Client] = {}  # one on each worker
    clients: dict[int, httpx.AsyncClient] = {}  # a kept-alive HTTP connection to each worker
    spare: list[Client] = []
    try:
        workers = _workers(served)
        assert len(workers) == 2
        for _ in range(40):
            socket = await login(served.url, SECRET, user)
            sockets.setdefault(_worker_of(socket.conn.local_address[1], workers), socket)
            if socket not in sockets.values():
                spare.append(socket)
            if len(sockets) == 2:
                break
        assert len(sockets) == 2, "every socket went to the same worker"
        for _ in range(40):
            http = httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{api_port}",
                timeout=10,
                limits=httpx.Limits(max_connections=1),
            )
            response = await http.get("/personas", headers=auth(user))
            local = response.extensions["network_stream"].get_extra_info("client_addr")
            pid = _worker_of(local[1], workers)
            if pid in clients:
                await http.aclose()
            else:
                clients[pid] = http
            if len(clients) == 2:
                break
        assert len(clients) == 2, "every HTTP connection went to the same worker"
        await with_avatar(next(iter(sockets.values())), "friendly")
        for socket in sockets.values():
            assert (await chat(socket, "hello"))["persona"] == "friendly"
        for round_, persona in enumerate(PERSONAS * 2):
            via = list(clients)[round_ % 2]
            pushes = [asyncio.create_task(pushed(s)) for s in sockets.values()]
            response = await clients[via].patch(
                "/avatars/me/persona", json={"personality": persona}, headers=auth(user)
            )
            assert response.status_code == 200, response.text
            told = await asyncio.gather(*pushes)
            assert {frame["personality"] for frame, _ in told} == {persona}
            replies = await asyncio.gather(*(chat(s, "which one?") for s in sockets.values()))
            assert [r["persona"] for r in replies] == [persona, persona]
    finally:
        for http in clients.values():
            await http.aclose()
        for socket in [*sockets.values(), *spare]:
            await socket.__aexit__(None, None, None)
        assert await served.stop() == 0
