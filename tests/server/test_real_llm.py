"""The OpenAI generator against a real model: llama.cpp's llama-server with SmolLM2-135M-Instruct.

Opt-in, because llama-server must be built first (once, about 13 minutes on 2 cores):

    eval "$(scripts/build_llama_server.sh)"       # sets LLAMA_SERVER_BIN and LLAMA_MODEL
    REAL_LLM=1 python -m pytest tests/server/test_real_llm.py

Without LLAMA_SERVER_BIN and LLAMA_MODEL the tests look in the script's default cache. Each
test starts llama-server on a free port of 127.0.0.1 with LLAMA_SERVER_SLOTS_DEBUG=1, so that
GET /slots shows the prompt the chat template rendered, and its output goes to a log file.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.app import App
from server.render import persona_system_prompt, switch_note
from tests import client as clients
from tests.client import Client
from tests.conftest import AppFactory, ClientFactory, with_avatar
from tests.personas import BUILTIN_CARDS, get_card

OTHERS = {card.id: card for card in BUILTIN_CARDS}.get  # the catalogue's lookup, by id

pytestmark = pytest.mark.skipif(
    os.environ.get("REAL_LLM") != "1",
    reason="opt-in: needs llama-server and a model (scripts/build_llama_server.sh); set REAL_LLM=1",
)

CACHE = Path(
    os.environ.get("PERSONA_CHAT_LLAMA_DIR")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "persona-chat/llama"
)
SERVER_BIN = Path(os.environ.get("LLAMA_SERVER_BIN") or CACHE / "bin/llama-server")
MODEL = Path(os.environ.get("LLAMA_MODEL") or CACHE / "models/SmolLM2-135M-Instruct.Q4_1.gguf")

MAX_TOKENS = 16  # the tiny model rambles: short replies keep the tests fast
LONG_MAX_TOKENS = 1024  # a reply that is still streaming when it is cancelled or killed
LONG_STORY = "Tell me a very long story about a dragon and a baker, with many chapters."
STARTUP_S = 60.0
REPLY_S = 60.0  # a real model on two shared cores: the tests' usual 10 s is not enough
chat = functools.partial(clients.chat, timeout=REPLY_S)
first_delta = functools.partial(clients.first_delta, timeout=REPLY_S)
CANCEL_LOG = "cancel task, id_task = {task}"  # what llama-server logs when it drops a task


@dataclass(slots=True)
class LlamaServer:
    """One llama-server process on 127.0.0.1, its output in a log file."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_llama(log: Path) -> LlamaServer:
    """Start llama-server with the model and wait until /health says it is ready."""
    for path in (SERVER_BIN, MODEL):
        if not path.is_file():
            pytest.fail(f"{path} is missing: run scripts/build_llama_server.sh first")
    port = free_port()
    command = [
        str(SERVER_BIN),
        "--model", str(MODEL),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--parallel", "1",  # one slot: GET /slots shows the latest request's prompt
        "--ctx-size", "4096",
        "--threads", "1",  # two spin-wait on a busy 2-core machine: 0.5-2 s a token, not 12 ms
        "--seed", "7",  # the same replies every run
        "--slots",
    ]  # fmt: skip
    env = {**os.environ, "LLAMA_SERVER_SLOTS_DEBUG": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = LlamaServer(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"llama-server exited with {process.returncode}:\n{server.log_text()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop()
    pytest.fail(f"llama-server was not ready within {STARTUP_S} s:\n{server.log_text()}")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """One llama-server for the module's tests that leave it running."""
    server = start_llama(tmp_path_factory.mktemp("llama") / "llama-server.log")
    yield server
    server.stop()


@pytest.fixture
def doomed_llama(tmp_path: Path) -> Iterator[LlamaServer]:
    """A llama-server of the test's own, to be killed."""
    server = start_llama(tmp_path / "llama-server.log")
    yield server
    server.stop()


def settings_for(llama: LlamaServer, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    return {
        "generator": "openai",
        "llm_base_url": llama.base_url,
        "llm_model": "smollm2-135m-instruct",  # llama-server serves the one model it loaded
        "llm_max_tokens": max_tokens,
    }


@pytest.fixture
async def app(make_app: AppFactory, llama: LlamaServer) -> App:
    """The server under test streams from the real model (overrides conftest's `app`)."""
    return await make_app(**settings_for(llama))


@pytest.fixture
async def client(connect: ClientFactory) -> Client:
    client = await connect()
    await with_avatar(client, "friendly")
    return client


async def long_client(make_app: AppFactory, connect: ClientFactory, llama: LlamaServer) -> Client:
    """A client of a server that lets replies run long enough to be stopped mid-stream."""
    app = await make_app(**settings_for(llama, LONG_MAX_TOKENS))
    client = await connect(target=app)
    await with_avatar(client, "friendly")
    return client


async def final(client: Client, ref: str) -> dict[str, Any]:
    while True:
        frame = await client.recv(timeout=60.0)
        if frame.get("ref") == ref and frame["type"] != "reply_delta":
            return frame


async def the_slot(llama: LlamaServer) -> dict[str, Any]:
    """GET /slots: the one slot, with the prompt of its latest task as the template rendered it."""
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{llama.url}/slots", timeout=10.0)
    response.raise_for_status()
    (slot,) = response.json()
    assert isinstance(slot, dict)
    return slot


async def rendered_prompt(llama: LlamaServer) -> str:
    prompt = (await the_slot(llama))["prompt"]
    assert isinstance(prompt, str)
    return prompt


async def logged(llama: LlamaServer, line: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if line in llama.log_text():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_reply_streams_deltas_then_a_reply_with_usage(client: Client) -> None:
    deltas, reply = await chat(client, "Hi! What is your favourite season?")
    assert (reply["type"], reply["status"], reply["persona"]) == ("reply", "completed", "friendly")
    streamed = "".join(d["delta"] for d in deltas)
    assert len(deltas) >= 2  # streamed as the tokens came, not in one piece at the end
    assert streamed.strip()
    assert reply["text"].startswith(streamed)
    assert {d["reply_id"] for d in deltas} == {reply["reply_id"]}
    usage = reply["usage"]
    assert 0 < usage["completion_tokens"] <= MAX_TOKENS
    assert usage["prompt_tokens"] > len(persona_system_prompt(get_card("friendly"), "Ava").split())
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_rendered_prompt_holds_the_persona_system_prompt(
    client: Client, llama: LlamaServer
) -> None:
    friendly = get_card("friendly")
    await chat(client, "Hi! What is your favourite season?")
    prompt = await rendered_prompt(llama)
    assert persona_system_prompt(friendly, "Ava") in prompt
    assert "Hi! What is your favourite season?" in prompt
    assert friendly.post_history_instruction in prompt
    assert prompt.index(persona_system_prompt(friendly, "Ava")) < prompt.index("favourite season")


async def test_switch_changes_the_next_prompt(client: Client, llama: LlamaServer) -> None:
    friendly, witty = get_card("friendly"), get_card("witty")
    await chat(client, "Hi! What is your favourite season?")
    assert persona_system_prompt(friendly, "Ava") in await rendered_prompt(llama)
    answer = await client.request({"type": "set_persona", "personality": "witty"})
    assert answer["type"] == "persona_set"
    _, reply = await chat(client, "And what do you think of Mondays?")
    assert (reply["status"], reply["persona"]) == ("completed", "witty")
    prompt = await rendered_prompt(llama)
    assert persona_system_prompt(witty, "Ava") in prompt
    assert witty.post_history_instruction in prompt
    assert persona_system_prompt(friendly, "Ava") not in prompt
    assert "favourite season" in prompt  # the history stays; only the persona changed


async def test_two_switches_are_marked_in_the_rendered_prompt(
    client: Client, llama: LlamaServer
) -> None:
    witty, caring = get_card("witty"), get_card("caring")
    await chat(client, "Hi! What is your favourite season?")
    await client.request({"type": "set_persona", "personality": "witty"})
    await chat(client, "What do you think of Mondays?")
    await client.request({"type": "set_persona", "personality": "caring"})
    _, reply = await chat(client, "I feel a bit tired today.")
    assert (reply["status"], reply["persona"]) == ("completed", "caring")
    prompt = await rendered_prompt(llama)
    to_witty = switch_note("friendly", witty, others=OTHERS)
    to_witty = f"<|im_end|>\n<|im_start|>system\n{to_witty}<|im_end|>\n"
    to_caring = switch_note("witty", caring, examples=True, others=OTHERS)
    to_caring = f"<|im_end|>\n<|im_start|>system\n{to_caring}<|im_end|>\n"
    # each marker closes a reply in the old voice and opens the turn of the new one
    assert f"{to_witty}<|im_start|>user\nWhat do you think of Mondays?" in prompt
    assert f"{to_caring}<|im_start|>user\nI feel a bit tired today." in prompt
    assert prompt.count("Persona switch: ") == 2
    replies = prompt.split("<|im_start|>assistant\n")
    assert len(replies) == 4  # two replies in the history, then the one being generated
    assert to_witty in replies[1] and to_caring in replies[2] and replies[3] == ""


async def test_cancel_aborts_the_upstream_task(
    make_app: AppFactory, connect: ClientFactory, llama: LlamaServer
) -> None:
    client = await long_client(make_app, connect, llama)
    ref = await first_delta(client, LONG_STORY)
    await client.send({"type": "cancel"})
    reply = await final(client, ref)
    assert (reply["type"], reply["status"]) == ("reply", "cancelled")
    task = (await the_slot(llama))["id_task"]
    assert await logged(llama, CANCEL_LOG.format(task=task)), llama.log_text()[-3000:]
    slot = await the_slot(llama)
    assert (slot["id_task"], slot["is_processing"]) == (task, False)


async def test_killing_llama_server_mid_stream_answers_unavailable(
    make_app: AppFactory, connect: ClientFactory, doomed_llama: LlamaServer
) -> None:
    client = await long_client(make_app, connect, doomed_llama)
    ref = await first_delta(client, LONG_STORY)
    doomed_llama.process.send_signal(signal.SIGKILL)
    error = await final(client, ref)
    assert (error["type"], error["code"], error["status"]) == ("error", "unavailable", 503)
    assert error["message"].startswith(
        f"the LLM endpoint {doomed_llama.base_url} closed the stream before the reply finished"
    )
    assert doomed_llama.process.wait(10) == -signal.SIGKILL
