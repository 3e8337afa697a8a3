"""The bots across instances: several URLs sharing users, runs sharing users by run id,
switches through the HTTP API, and handshakes under the server's per-address limit."""

from __future__ import annotations

import asyncio
import functools
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.server import ServerConnection, serve

from clients.bots.load import LoadConfig, run_load
from clients.bots.net import default_api_url, is_loopback_url, targets_of
from clients.bots.plan import BotPlan
from run import build_parser, cmd_bots
from server.app import App
from server.auth import mint_token
from server.supervisor import reserve_port
from tests.conftest import SECRET, AppFactory
from tests.personas import BUILTIN_IDS as IDS

TOKEN_FOR = functools.partial(mint_token, SECRET)


@pytest.fixture
def api_ports() -> Iterator[list[int]]:
    """Two free ports for HTTP APIs, held (SO_REUSEPORT) until the test ends."""
    holders = [reserve_port("127.0.0.1", 0) for _ in range(2)]
    yield [holder.getsockname()[1] for holder in holders]
    for holder in holders:
        holder.close()


async def two_apps(make_app: AppFactory, api_ports: list[int] | None = None) -> list[App]:
    """Two servers on one database, as two instances behind a load balancer."""
    if api_ports is None:
        return [await make_app(), await make_app()]
    return [await make_app(api_port=port, reuse_port=True) for port in api_ports]


def assert_clean(report: dict[str, Any]) -> None:
    assert report["errors"] == {}, report["errors"]
    assert report["totals"]["stale_renders"] == 0, report["stale_examples"]
    assert report["ok"] is True


async def test_bots_over_two_instances_see_switches_made_on_the_other(
    make_app: AppFactory,
) -> None:
    apps = await two_apps(make_app)
    seen: list[list[int]] = []

    async def count_sessions() -> None:
        seen.append([len(app.sessions) for app in apps])

    config = LoadConfig(
        plan=BotPlan(url=apps[0].url, switch_every=2, invalid_every=0),
        urls=tuple(app.url for app in apps),
        clients=8,
        users=2,
        duration_s=2.0,
        ramp_s=0.2,
        token_for=TOKEN_FOR,
    )
    report = await run_load(config, on_ready=count_sessions)
    assert_clean(report)
    assert seen == [[4, 4]]  # round-robin over the instances
    totals = report["totals"]
    assert totals["switch_acks"] == totals["switches"] > 0
    # each switch is pushed to the user's 3 other connections (2 on the other instance) while
    # they are open
    assert 0 < totals["pushes_expected"] <= 3 * totals["switch_acks"]
    assert 0 < totals["pushes_received"] <= totals["pushes_expected"]
    propagation = report["latency_ms"]["propagation"]
    assert propagation["count"] == totals["pushes_received"]
    assert propagation["p99"] >= propagation["p50"] and propagation["max"] < 5000
    assert report["config"]["urls"] == [app.url for app in apps]


def test_each_user_spans_the_instances() -> None:
    from clients.bots.load import make_bots
    from clients.bots.plan import Phase
    from clients.bots.report import Stats

    config = LoadConfig(
        plan=BotPlan(url="ws://127.0.0.1:1/ws"),
        urls=("ws://127.0.0.1:1/ws", "ws://127.0.0.1:2/ws"),
        clients=6,
        users=3,
        duration_s=1.0,
        token_for=lambda user: user,
    )
    bots = make_bots(config, Stats(), Phase())
    by_user: dict[str, set[str]] = {}
    for bot in bots:
        by_user.setdefault(bot.user, set()).add(bot.url)
    assert all(len(urls) == 2 for urls in by_user.values()) and len(by_user) == 3
    assert sorted(bot.url for bot in bots) == sorted(config.urls * 3)


async def test_two_runs_with_one_run_id_share_their_users(make_app: AppFactory) -> None:
    apps = await two_apps(make_app)
    run_id = secrets.token_hex(4)
    configs = [
        LoadConfig(
            plan=BotPlan(url=app.url, switch_every=2, invalid_every=0),
            clients=1,  # one connection per user in each run: every push is the other run's
            users=1,
            duration_s=2.0,
            token_for=TOKEN_FOR,
            run_id=run_id,
            shared_run=True,
        )
        for app in apps
    ]
    reports = await asyncio.gather(*(run_load(config) for config in configs))
    for report in reports:
        assert_clean(report)
        assert report["config"]["run_id"] == run_id
        assert report["totals"]["switches"] > 0
        assert report["totals"]["pushes"] > 0  # the other run's switches reached this one


async def test_bots_switching_over_http_find_no_stale_render(
    make_app: AppFactory, api_ports: list[int]
) -> None:
    apps = await two_apps(make_app, api_ports)
    config = LoadConfig(
        plan=BotPlan(url=apps[0].url, switch_every=2, invalid_every=0, http_switch_ratio=0.5),
        urls=tuple(app.url for app in apps),
        api_urls=tuple(str(app.api_url) for app in apps),
        clients=6,
        users=3,
        duration_s=2.0,
        ramp_s=0.2,
        token_for=TOKEN_FOR,
    )
    report = await run_load(config)
    assert_clean(report)
    totals = report["totals"]
    assert totals["http_switches"] > 0 and totals["switch_acks"] > 0
    # half the switches go through the API (each bot alternates), the rest over the socket
    assert abs(totals["http_switches"] - totals["switch_acks"]) <= config.clients
    assert report["latency_ms"]["http_switch"]["count"] == totals["http_switches"]
    assert totals["pushes_received"] > 0


async def test_bots_command_switches_over_http(
    make_app: AppFactory, api_ports: list[int], tmp_path: Path
) -> None:
    app = await make_app(api_port=api_ports[0], reuse_port=True)
    path = tmp_path / "report.json"
    argv = ["bots", "--url", app.url, "--api-url", str(app.api_url), "--secret", SECRET]
    argv += ["--json", str(path), "--quiet", "--clients", "2", "--duration", "1"]
    argv += ["--switch-every", "1", "--http-switch-ratio", "1", "--run-id", "cli-http"]
    status = await asyncio.to_thread(cmd_bots, build_parser().parse_args(argv))
    report = orjson.loads(path.read_bytes())
    assert status == 0, report["errors"]
    assert report["totals"]["http_switches"] == report["totals"]["switches"] > 0
    assert report["config"]["run_id"] == "cli-http"


async def test_bots_stay_under_the_per_address_limit_and_retry_its_refusals(
    make_app: AppFactory,
) -> None:
    app = await make_app(max_preauth_per_ip=2)
    config = LoadConfig(
        plan=BotPlan(url=app.url, chat=False),
        clients=60,
        duration_s=0.2,
        token_for=TOKEN_FOR,
        per_source=4,  # over the server's 2: refusals that the bots must take in their stride
    )
    report = await run_load(config)
    assert_clean(report)
    assert report["totals"]["clients_ready"] == 60
    assert report["totals"]["pongs"] == 60
    assert report["totals"]["connect_retries"] > 0
    assert report["config"]["source_addresses"] > 1


def test_api_urls_pair_with_urls_and_default_to_port_8766() -> None:
    targets = targets_of(["ws://10.0.0.1:8765/ws", "wss://chat.example/ws"], ["http://a:1/"])
    assert [t.api_url for t in targets] == ["http://a:1", "https://chat.example:8766"]
    assert default_api_url("ws://[::1]:8765/ws") == "http://[::1]:8766"
    assert is_loopback_url("ws://127.0.0.1:8765/ws") and is_loopback_url("ws://127.0.0.9/ws")
    assert not is_loopback_url("ws://localhost:8765/ws")
    assert not is_loopback_url("ws://10.0.0.1:8765/ws")
    with pytest.raises(ValueError):
        targets_of(["ws://a/ws"], ["http://a", "http://b"])


class PatchServer:
    """A WebSocket side and an HTTP API side of one fake instance. A PATCH commits after
    50 ms, pushes `persona_changed` and answers 200; a chat is rendered with the persona current
    when it is read, or (`stale`) with the one before the last switch, which the bot must catch
    once it has both the 200 and the push."""

    def __init__(self, stale: bool) -> None:
        self.stale = stale
        self.current, self.before = "friendly", "friendly"
        self.sockets: set[ServerConnection] = set()

    async def handle_ws(self, ws: ServerConnection) -> None:
        self.sockets.add(ws)
        try:
            async for raw in ws:
                frame = orjson.loads(raw)
                ref = frame.get("id")
                if frame["type"] == "hello":
                    avatar = {"id": 1, "name": "Ava", "personality": self.current}
                    limits = {"max_frame_bytes": 65536, "max_text_chars": 4000, "rate_per_s": 1e3}
                    answer = {"type": "welcome", "ref": ref, "avatar": avatar, "limits": limits}
                    answer["personas"] = [{"id": p, "name": p, "description": ""} for p in IDS]
                else:
                    persona = self.before if self.stale else self.current
                    answer = {"type": "reply", "ref": ref, "persona": persona, "text": "hi"}
                    answer |= {"status": "completed", "reply_id": 2, "message_id": 1}
                await ws.send(orjson.dumps(answer).decode())
        finally:
            self.sockets.discard(ws)

    async def handle_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            wanted = orjson.loads(await reader.readexactly(length))["personality"]
            await asyncio.sleep(0.05)
            self.before, self.current = self.current, wanted
            push = {"type": "persona_changed", "personality": wanted, "previous": self.before}
            for ws in list(self.sockets):
                await ws.send(orjson.dumps(push).decode())
            body = orjson.dumps({"personality": wanted, "previous": self.before, "avatar": {}})
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
            writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
        writer.close()


@pytest.mark.parametrize("stale", [False, True])
async def test_bots_expect_the_patched_persona_once_they_have_the_200_and_the_push(
    stale: bool,
) -> None:
    fake = PatchServer(stale)
    http = await asyncio.start_server(fake.handle_http, "127.0.0.1", 0)
    async with serve(fake.handle_ws, "127.0.0.1", 0) as ws_server:
        ws_port = next(iter(ws_server.sockets)).getsockname()[1]
        api_port = http.sockets[0].getsockname()[1]
        url = f"ws://127.0.0.1:{ws_port}/ws"
        config = LoadConfig(
            # chats 30 ms apart: some while the PATCH (50 ms) is in flight, some after it
            plan=BotPlan(
                url=url, switch_every=4, invalid_every=0, think_s=0.03, http_switch_ratio=1
            ),
            api_urls=(f"http://127.0.0.1:{api_port}",),
            clients=1,
            duration_s=1.5,
            token_for=TOKEN_FOR,
        )
        report = await run_load(config)
    http.close()
    await http.wait_closed()
    totals = report["totals"]
    assert totals["http_switches"] > 2 and report["errors"] == {}
    # the chat sent while a PATCH is in flight is answered with the persona before it: right
    assert (totals["stale_renders"] > 0) is stale, report["stale_examples"]
    if stale:
        example = report["stale_examples"][0]
        assert example["persona"] not in example["expected"]
        # after a settled PATCH, only its persona: the one before it is stale
        assert any(len(e["expected"]) == 1 for e in report["stale_examples"])
