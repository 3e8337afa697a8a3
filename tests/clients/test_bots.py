"""The load-test bots: a short run against a real server, and a stale render they must catch."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.server import ServerConnection, serve

from clients.bots.load import LoadConfig, run_load
from clients.bots.plan import BotPlan
from run import build_parser, cmd_bots
from server.auth import mint_token
from tests.conftest import SECRET, AppFactory
from tests.personas import BUILTIN_IDS

TOKEN_FOR = functools.partial(mint_token, SECRET)


def bots_args(url: str, json_path: Path, *extra: str) -> Any:
    return build_parser().parse_args(
        ["bots", "--url", url, "--secret", SECRET, "--json", str(json_path), "--quiet", *extra]
    )


async def test_bots_run_against_the_server_finds_no_stale_render(make_app: AppFactory) -> None:
    app = await make_app()
    config = LoadConfig(
        plan=BotPlan(url=app.url, switch_every=2, invalid_every=2),
        clients=5,
        users=2,
        duration_s=2.0,
        ramp_s=0.3,
        token_for=TOKEN_FOR,
    )
    report = await run_load(config)
    totals = report["totals"]
    assert report["errors"] == {}
    assert totals["stale_renders"] == 0
    assert totals["clients_ready"] == 5
    assert totals["replies"] > 10
    assert totals["switches"] > 0 and totals["switch_acks"] == totals["switches"]
    assert totals["invalid_personas_sent"] == totals["invalid_personas_rejected"] > 0
    latency = report["latency_ms"]
    assert latency["chat"]["p99"] > 0
    # every second chat follows a switch: those are reported on their own as well
    after = latency["chat_after_switch"]["count"]
    assert 0 < after <= totals["switches"] and after < latency["chat"]["count"]
    assert report["ok"] is True


async def test_bots_command_writes_a_json_report(make_app: AppFactory, tmp_path: Path) -> None:
    app = await make_app()
    path = tmp_path / "report.json"
    args = bots_args(app.url, path, "--clients", "3", "--users", "2", "--duration", "1")
    status = await asyncio.to_thread(cmd_bots, args)
    report = orjson.loads(path.read_bytes())
    assert status == 0
    assert report["totals"]["replies"] > 0
    assert report["totals"]["stale_renders"] == 0
    assert set(report["latency_ms"]) == {
        "chat",
        "chat_after_switch",
        "switch_ack",
        "http_patch",
        "http_switch",
        "propagation",
    }


# ---------------------------------------------------------------- a server that renders stale


class StaleServer:
    """Speaks just enough of the protocol, but renders every reply with the first persona."""

    def __init__(self) -> None:
        self.first = "friendly"

    async def handle(self, ws: ServerConnection) -> None:
        current = self.first
        async for raw in ws:
            frame = orjson.loads(raw)
            answer, current = self.answer(frame, current)
            await ws.send(orjson.dumps(answer).decode())

    def answer(self, frame: dict[str, Any], current: str) -> tuple[dict[str, Any], str]:
        ref = frame.get("id")
        kind = frame["type"]
        text = str(frame.get("text", ""))
        if kind == "hello":
            avatar = {"id": 1, "name": "Ava", "personality": self.first}
            limits = {"max_frame_bytes": 65536, "max_text_chars": 4000, "rate_per_s": 1000.0}
            personas = [{"id": p, "name": p.title(), "description": ""} for p in BUILTIN_IDS]
            welcome = {"type": "welcome", "ref": ref, "avatar": avatar, "personas": personas}
            return {**welcome, "limits": limits}, current
        if kind == "set_persona" or text.startswith("/persona "):
            wanted = frame.get("personality") or text.removeprefix("/persona ")
            if wanted == "no-such-persona":
                error = {"type": "error", "ref": ref, "code": "invalid_persona", "status": 422}
                return error, current
            persona_set = {"type": "persona_set", "ref": ref, "personality": wanted}
            return persona_set | {"previous": current}, wanted
        reply = {"type": "reply", "ref": ref, "persona": self.first, "status": "completed"}
        return reply | {"reply_id": 2, "message_id": 1, "text": "hi"}, current


class FailingSwitchServer(StaleServer):
    """Answers every switch `unavailable`, as a server whose database went away around the
    commit; it applies the switch or not (the client cannot tell which). The chat sent behind
    the switch fails the same way, or (read once the switch had failed) gets a reply. Replies
    carry the persona the server really has: none is stale."""

    def __init__(self, applies: bool, fails_behind: bool) -> None:
        super().__init__()
        self.applies = applies
        self.fails_behind = fails_behind

    async def handle(self, ws: ServerConnection) -> None:
        current, failed = self.first, False
        async for raw in ws:
            frame = orjson.loads(raw)
            ref, text = frame.get("id"), str(frame.get("text", ""))
            unavailable = {"type": "error", "ref": ref, "code": "unavailable", "status": 503}
            if frame["type"] == "set_persona" or text.startswith("/persona "):
                wanted = frame.get("personality") or text.removeprefix("/persona ")
                if wanted != "no-such-persona":
                    current, failed = wanted if self.applies else current, self.fails_behind
                    await ws.send(orjson.dumps(unavailable).decode())
                    continue
            elif frame["type"] == "chat" and failed:
                failed = False
                await ws.send(orjson.dumps(unavailable).decode())
                continue
            answer, current = self.answer(frame, current)
            if answer["type"] == "reply":
                answer["persona"] = current
            await ws.send(orjson.dumps(answer).decode())


@pytest.mark.parametrize(
    ("applies", "fails_behind"), [(False, True), (True, True), (False, False), (True, False)]
)
async def test_bots_take_a_failed_switch_as_perhaps_applied(
    applies: bool, fails_behind: bool
) -> None:
    server_ = FailingSwitchServer(applies, fails_behind)
    async with serve(server_.handle, "127.0.0.1", 0) as server:
        url = f"ws://127.0.0.1:{next(iter(server.sockets)).getsockname()[1]}/ws"
        config = LoadConfig(
            plan=BotPlan(url=url, switch_every=2), clients=2, duration_s=0.5, token_for=TOKEN_FOR
        )
        report = await run_load(config)
    assert report["totals"]["replies"] > 0 and report["totals"]["switches"] > 0
    assert report["totals"]["stale_renders"] == 0, report["stale_examples"]
    assert set(report["errors"]) == {"unavailable"}  # counted, as every unexpected error is


class PushThenFailServer(StaleServer):
    """While the bot's switch is pending, another connection's change is pushed; then the
    switch fails `unavailable`, not applied. The reply to the chat sent behind it carries the
    pushed persona (right), or with `stale` the one from before the switch, which the push made
    old: the bots must count that one."""

    def __init__(self, stale: bool) -> None:
        super().__init__()
        self.stale = stale

    async def handle(self, ws: ServerConnection) -> None:
        current, before = self.first, ""
        async for raw in ws:
            frame = orjson.loads(raw)
            ref, text = frame.get("id"), str(frame.get("text", ""))
            if frame["type"] == "set_persona" or text.startswith("/persona "):
                wanted = frame.get("personality") or text.removeprefix("/persona ")
                if wanted != "no-such-persona":
                    pushed = next(p for p in BUILTIN_IDS if p not in (current, wanted))
                    push = {"type": "persona_changed", "personality": pushed, "previous": current}
                    await ws.send(orjson.dumps(push).decode())
                    before, current = current, pushed
                    error = {"type": "error", "ref": ref, "code": "unavailable", "status": 503}
                    await ws.send(orjson.dumps(error).decode())
                    continue
            answer, current = self.answer(frame, current)
            if answer["type"] == "reply":
                answer["persona"] = before if self.stale and before else current
                before = ""
            await ws.send(orjson.dumps(answer).decode())


@pytest.mark.parametrize("stale", [False, True])
async def test_bots_judge_the_chat_behind_a_failed_switch_by_what_was_pushed_meanwhile(
    stale: bool,
) -> None:
    async with serve(PushThenFailServer(stale).handle, "127.0.0.1", 0) as server:
        url = f"ws://127.0.0.1:{next(iter(server.sockets)).getsockname()[1]}/ws"
        config = LoadConfig(
            plan=BotPlan(url=url, switch_every=2), clients=2, duration_s=0.5, token_for=TOKEN_FOR
        )
        report = await run_load(config)
    assert report["totals"]["switches"] > 0
    assert (report["totals"]["stale_renders"] > 0) is stale, report["stale_examples"]


@pytest.fixture
async def stale_url() -> AsyncIterator[str]:
    async with serve(StaleServer().handle, "127.0.0.1", 0, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws"


async def test_bots_catch_a_reply_rendered_with_the_old_persona(stale_url: str) -> None:
    config = LoadConfig(
        plan=BotPlan(url=stale_url, switch_every=2), clients=2, duration_s=0.5, token_for=TOKEN_FOR
    )
    report = await run_load(config)
    assert report["totals"]["stale_renders"] > 0
    example = report["stale_examples"][0]
    assert example["persona"] == "friendly" and "friendly" not in example["expected"]
    assert report["errors"] == {}
    assert report["ok"] is False


async def test_bots_command_exits_non_zero_on_a_stale_render(
    stale_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "report.json"
    args = bots_args(stale_url, path, "--clients", "2", "--duration", "0.5", "--switch-every", "1")
    status = await asyncio.to_thread(cmd_bots, args)
    assert status == 1
    assert orjson.loads(path.read_bytes())["totals"]["stale_renders"] > 0
