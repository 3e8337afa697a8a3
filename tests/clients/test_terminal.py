"""`python run.py chat` against a real server: in a pseudo-terminal, and fed from a pipe."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pexpect
import pytest

from clients.terminal import PAGE_SIZE, Listing, listing_for, personas_page
from protocol.frames import PersonaInfo
from protocol.text import printable
from server.app import App
from server.auth import mint_token
from server.store import Store
from tests.client import Client
from tests.conftest import SECRET, AppFactory, ClientFactory, with_avatar
from tests.personas import add_personas, minimal_card, remove_personas

ROOT = Path(__file__).resolve().parents[2]
RUN_PY = str(ROOT / "run.py")
TIMEOUT_S = 20.0


def client_env(home: Path) -> dict[str, str]:
    """The environment without the server's settings, so that only the flags count."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    env.pop("DATABASE_URL", None)
    env.update(HOME=str(home), TERM="xterm-256color", PROMPT_TOOLKIT_NO_CPR="1")
    return env


ExtraPersonas = Callable[[int], Awaitable[list[str]]]


@pytest.fixture
async def extra_personas(database_url: str) -> AsyncIterator[ExtraPersonas]:
    """Add N enabled personas to the catalogue (`extra-0001`, ...; start the server after, so
    that it loads them); they are removed after the test (the database is shared by the run)."""
    added: list[str] = []
    store = await Store.connect(database_url, min_size=1, max_size=1)
    try:
        await store.migrate()  # the catalogue's table, should this test be the run's first
    finally:
        await store.close()

    async def add(count: int) -> list[str]:
        added.extend(await add_personas(database_url, count, "extra"))
        return added

    yield add
    if added:
        await remove_personas(database_url, added)


# ---------------------------------------------------------------------------- paging


def persona(index: int) -> PersonaInfo:
    return PersonaInfo(id=f"p-{index:02d}", name=f"P {index}", description=f"number {index}")


CATALOGUE = [persona(index) for index in range(1, 46)]  # 45: pages of 20, 20 and 5


def test_personas_page_says_how_many_and_how_to_see_the_next_page() -> None:
    first = personas_page(CATALOGUE, Listing()).splitlines()
    assert first[0] == "45 personas, page 1 of 3 (1-20):"
    assert first[1] == "  p-01          number 1"
    assert len(first) == 1 + PAGE_SIZE + 1
    assert first[-1] == "/personas more for page 2"
    last = personas_page(CATALOGUE, Listing(page=3)).splitlines()
    assert last == [
        "45 personas, page 3 of 3 (41-45):",
        *(f"  p-{n}          number {n}" for n in range(41, 46)),
        "(the last page)",
    ]


def test_a_short_catalogue_is_one_page_without_page_numbers() -> None:
    assert personas_page(CATALOGUE[:2], Listing()).splitlines() == [
        "2 personas:",
        "  p-01          number 1",
        "  p-02          number 2",
    ]


def test_personas_more_continues_the_last_list_and_words_filter_it() -> None:
    assert listing_for("", Listing(page=0)) == Listing(page=1)
    assert listing_for("more", Listing(page=0)) == Listing(page=1)
    assert listing_for("more", Listing(("p-1",), 1)) == Listing(("p-1",), 2)
    assert listing_for("3", Listing(("p-1",), 1)) == Listing(page=3)
    assert listing_for("Number 4", Listing(page=2)) == Listing(("number", "4"), 1)
    found = personas_page(CATALOGUE, Listing(("number", "4"), 1)).splitlines()
    assert found[0] == "10 personas match 'number 4':"  # 4, 14, 24, 34 and 40 to 45
    assert personas_page(CATALOGUE, Listing(("nobody",), 1)) == "no personas match 'nobody'"


def test_a_page_past_the_end_says_which_pages_there_are() -> None:
    assert personas_page(CATALOGUE, Listing(page=4)) == (
        "no page 4: 45 personas, pages 1 to 3 (/personas 1)"
    )
    assert personas_page(CATALOGUE, Listing(page=0)).startswith("no page 0: ")


# ---------------------------------------------------------------------------- from a pipe


@dataclass(frozen=True)
class Finished:
    code: int
    stdout: str
    stderr: str


async def run_piped(tmp_path: Path, args: list[str], stdin: str = "") -> Finished:
    """Run the client with stdin from a pipe (not a terminal) and wait for it to exit."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        RUN_PY,
        "chat",
        "--data-dir",
        str(tmp_path),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=client_env(tmp_path),
    )
    out, err = await asyncio.wait_for(process.communicate(stdin.encode()), TIMEOUT_S)
    assert process.returncode is not None
    return Finished(process.returncode, out.decode(), err.decode())


async def history_of(client: Client) -> list[tuple[str, str, str]]:
    answer = await client.request({"type": "history"})
    return [(m["role"], m["persona"], m["text"]) for m in answer["messages"]]


async def test_piped_lines_print_one_reply_each_and_exit_0(
    app: App, connect: ClientFactory, user: str, tmp_path: Path
) -> None:
    await with_avatar(await connect(user))
    lines = "I baked bread today\nthe garden is blooming\n"
    result = await run_piped(
        tmp_path, ["--url", app.url, "--token", mint_token(SECRET, user)], lines
    )
    assert result.code == 0, result.stderr
    replies = result.stdout.splitlines()
    assert len(replies) == 2
    assert "baked bread today" in replies[0]
    assert "garden is blooming" in replies[1]


async def test_piped_persona_command_applies_to_the_next_reply(
    app: App, connect: ClientFactory, user: str, tmp_path: Path
) -> None:
    client = await connect(user)
    await with_avatar(client, "friendly")
    token = mint_token(SECRET, user)
    result = await run_piped(tmp_path, ["--url", app.url, "--token", token], "/persona witty\nhi\n")
    assert result.code == 0, result.stderr
    assert "persona: witty (was friendly)" in result.stderr
    assert (await history_of(client))[-1][:2] == ("assistant", "witty")


async def test_piped_chat_refused_overloaded_is_sent_again_after_the_delay(
    make_app: AppFactory, connect: ClientFactory, user: str, tmp_path: Path
) -> None:
    app = await make_app(overload_lag_ms=100, overload_calm_s=0.5)
    await with_avatar(await connect(user, target=app))
    load = app.services.state.load

    async def shed_until_a_chat_is_refused() -> None:
        while load.refused == 0:  # as when its database calls queue: see server/store
            load.strained(time.monotonic())
            await asyncio.sleep(0.05)

    shedding = asyncio.create_task(shed_until_a_chat_is_refused())
    token = mint_token(SECRET, user)
    result = await run_piped(tmp_path, ["--url", app.url, "--token", token], "I baked bread\n")
    await asyncio.wait_for(shedding, TIMEOUT_S)
    assert result.code == 0, result.stderr
    assert "baked bread" in result.stdout
    assert load.refused >= 1


async def test_piped_chat_creates_a_default_avatar_for_a_new_user(
    app: App, connect: ClientFactory, user: str, tmp_path: Path
) -> None:
    result = await run_piped(
        tmp_path, ["--url", app.url, "--token", mint_token(SECRET, user)], "hi\n"
    )
    assert result.code == 0, result.stderr
    assert "created the avatar Ava (friendly)" in result.stderr
    assert "rename" not in result.stderr  # nothing can rename an avatar
    avatar = (await connect(user)).welcome["avatar"]
    assert (avatar["name"], avatar["personality"]) == ("Ava", "friendly")


async def test_piped_error_answer_is_reported_and_exits_1(
    app: App, connect: ClientFactory, user: str, tmp_path: Path
) -> None:
    await with_avatar(await connect(user))
    token = mint_token(SECRET, user)
    result = await run_piped(tmp_path, ["--url", app.url, "--token", token], "/persona grumpy\n")
    assert result.code == 1
    assert "unknown personality 'grumpy'" in result.stderr
    assert result.stderr.count("choose one of") == 1
    assert result.stdout == ""


async def test_piped_personas_pages_the_catalogue(
    make_app: AppFactory,
    connect: ClientFactory,
    user: str,
    tmp_path: Path,
    extra_personas: ExtraPersonas,
) -> None:
    await extra_personas(45)  # 51 with the six built-in ones: pages of 20, 20 and 11
    app = await make_app()
    await with_avatar(await connect(user, target=app))
    token = mint_token(SECRET, user)
    lines = "/personas\n/personas more\n/personas 3\n/personas 4\n/personas extra-004\n"
    result = await run_piped(tmp_path, ["--url", app.url, "--token", token], lines)
    assert result.code == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[0] == "51 personas, page 1 of 3 (1-20):"
    assert out[1].split() == [
        "friendly",
        "Warm,",
        "upbeat",
        "and",
        "easy",
        "to",
        "talk",
        "to,",
        "like",
        "a",
        "good",
        "neighbour.",
    ]
    assert out[20].split()[0] == "extra-0014"
    assert out[21] == "/personas more for page 2"
    assert out[22] == "51 personas, page 2 of 3 (21-40):"
    assert out[23] == "  extra-0015    Extra 15, a test persona."
    assert out[43] == "/personas more for page 3"
    assert out[44] == "51 personas, page 3 of 3 (41-51):"
    assert out[55] == "  extra-0045    Extra 45, a test persona."
    assert out[56] == "(the last page)"
    assert out[57] == "no page 4: 51 personas, pages 1 to 3 (/personas 1)"
    assert out[58] == "6 personas match 'extra-004':"
    assert [line.split()[0] for line in out[59:]] == [f"extra-004{n}" for n in range(6)]


async def test_user_flag_signs_with_the_secret_in_the_data_dir(
    app: App, connect: ClientFactory, user: str, tmp_path: Path
) -> None:
    (tmp_path / "jwt_secret").write_text(SECRET + "\n", encoding="utf-8")
    result = await run_piped(tmp_path, ["--url", app.url, "--user", user], "hello from a pipe\n")
    assert result.code == 0, result.stderr
    history = await history_of(await connect(user))
    assert history[0] == ("user", "friendly", "hello from a pipe")


async def test_unreachable_server_exits_3_and_says_so(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"ws://127.0.0.1:{port}/ws"
    result = await run_piped(tmp_path, ["--url", url, "--token", "t"])
    assert result.code == 3
    assert f"cannot connect to {url}: connection refused" in result.stderr


async def test_wrong_path_exits_3_with_the_http_status(app: App, tmp_path: Path) -> None:
    url = app.url.replace("/ws", "/nope")
    result = await run_piped(tmp_path, ["--url", url, "--token", "t"])
    assert result.code == 3
    assert "the server answered HTTP 404" in result.stderr


async def test_url_without_ws_path_says_to_add_it(app: App, tmp_path: Path) -> None:
    url = app.url.removesuffix("/ws")
    result = await run_piped(tmp_path, ["--url", url, "--token", "t"])
    assert result.code == 3
    assert result.stderr.splitlines() == [
        f"chat: cannot connect to {url}: the server answered HTTP 200: add /ws to the URL"
        f" (--url {url}/ws)"
    ]


async def test_refused_token_exits_4_with_the_close_reason(app: App, tmp_path: Path) -> None:
    token = mint_token("some-other-secret-0123456789-0123456789", "mallory")
    result = await run_piped(tmp_path, ["--url", app.url, "--token", token], "hi\n")
    assert result.code == 4
    assert "the server refused the sign-in: bad token signature" in result.stderr


async def test_missing_user_and_token_exits_2(tmp_path: Path) -> None:
    result = await run_piped(tmp_path, [])
    assert result.code == 2
    assert "--user NAME" in result.stderr


# ---------------------------------------------------------------------------- in a terminal


class Terminal:
    """The client in a pseudo-terminal; the blocking pexpect calls run in a worker thread."""

    def __init__(self, child: pexpect.spawn[str]) -> None:
        self.child = child

    async def expect(self, pattern: str) -> None:
        await asyncio.to_thread(self.child.expect, pattern)

    def send(self, text: str) -> None:
        self.child.send(text)

    def sendline(self, text: str) -> None:
        self.child.sendline(text)

    def interrupt(self) -> None:
        self.child.sendintr()

    async def exit_code(self) -> int:
        await asyncio.to_thread(self.child.expect, pexpect.EOF)
        await asyncio.to_thread(self.child.close)
        assert self.child.exitstatus is not None
        return self.child.exitstatus


TerminalFactory = Callable[[App, str], Awaitable[Terminal]]


@pytest.fixture
async def terminal(tmp_path: Path) -> AsyncIterator[TerminalFactory]:
    """Start `run.py chat` for a user in a pseudo-terminal; make sure it is gone afterwards."""
    children: list[pexpect.spawn[str]] = []

    async def start(app: App, user: str) -> Terminal:
        args = ["chat", "--url", app.url, "--token", mint_token(SECRET, user)]
        child = pexpect.spawn(
            sys.executable,
            [RUN_PY, *args, "--data-dir", str(tmp_path)],
            cwd=ROOT,
            env=client_env(tmp_path),
            encoding="utf-8",
            timeout=TIMEOUT_S,
            dimensions=(40, 160),
        )
        children.append(child)
        return Terminal(child)

    yield start
    for child in children:
        if child.isalive():
            await asyncio.to_thread(child.terminate, True)


async def test_prompt_shows_the_current_persona(
    app: App, connect: ClientFactory, user: str, terminal: TerminalFactory
) -> None:
    await with_avatar(await connect(user), "playful")
    tty = await terminal(app, user)
    await tty.expect("Talking to Ava \\(playful\\)")
    await tty.expect("\\[playful\\]")


async def test_the_conversation_so_far_is_shown_with_failed_replies_marked(
    make_app: AppFactory, user: str, terminal: TerminalFactory
) -> None:
    with socket.socket() as sock:  # an LLM endpoint that refuses every connection
        sock.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        app = await make_app(generator="openai", llm_base_url=refused)
        client = Client(app.url)
        await client.__aenter__()
        try:
            await client.hello(mint_token(SECRET, user))
            await with_avatar(client, "caring")
            assert (await client.request({"type": "chat", "text": "still there?"}))["type"] == (
                "error"
            )
        finally:
            await client.__aexit__(None, None, None)
        tty = await terminal(app, user)
        await tty.expect("-- earlier --")
        await tty.expect("you: still there\\?")
        await tty.expect("Ava \\(caring\\): \\[failed: unavailable\\]")
        await tty.expect("Talking to Ava \\(caring\\)")


async def test_persona_command_switches_the_prompt(
    app: App, connect: ClientFactory, user: str, terminal: TerminalFactory
) -> None:
    await with_avatar(await connect(user), "friendly")
    tty = await terminal(app, user)
    await tty.expect("\\[friendly\\]")
    tty.sendline("/persona witty")
    await tty.expect("persona: witty \\(was friendly\\)")
    await tty.expect("\\[witty\\]")


async def test_reply_is_printed_after_the_avatar_and_persona(
    app: App, connect: ClientFactory, user: str, terminal: TerminalFactory
) -> None:
    await with_avatar(await connect(user), "caring")
    tty = await terminal(app, user)
    await tty.expect("\\[caring\\]")
    tty.sendline("I baked bread today")
    await tty.expect("Ava \\(caring\\): ")
    await tty.expect("baked bread today")
    await tty.expect("\\[caring\\]")


async def test_streamed_reply_is_printed_whole(
    make_app: AppFactory, connect: ClientFactory, user: str, terminal: TerminalFactory
) -> None:
    app = await make_app(template_delay_ms=60)
    client = await connect(user, target=app)
    await with_avatar(client, "witty")
    tty = await terminal(app, user)
    await tty.expect("\\[witty\\]")
    tty.sendline("tell me about tides")
    await tty.expect("Ava \\(witty\\): ")
    await tty.expect("\\[witty\\]")
    stored = (await history_of(client))[-1][2]
    assert stored in str(tty.child.before)


async def test_ctrl_c_during_a_reply_stops_it(
    make_app: AppFactory, connect: ClientFactory, user: str, terminal: TerminalFactory
) -> None:
    app = await make_app(template_delay_ms=500)
    await with_avatar(await connect(user, target=app))
    tty = await terminal(app, user)
    await tty.expect("\\[friendly\\]")
    tty.sendline("tell me a long story")
    await tty.expect("Ava \\(friendly\\): ")
    tty.interrupt()
    await tty.expect("\\[stopped\\]")
    await tty.expect("\\[friendly\\]")


async def test_persona_changed_in_another_window_updates_the_prompt(
    app: App, connect: ClientFactory, user: str, terminal: TerminalFactory
) -> None:
    client = await connect(user)
    await with_avatar(client, "friendly")
    tty = await terminal(app, user)
    await tty.expect("\\[friendly\\]")
    await client.request({"type": "set_persona", "personality": "romantic"})
    await tty.expect("persona changed to romantic in another window")
    await tty.expect("\\[romantic\\]")


async def test_new_user_is_asked_for_name_and_personality(
    app: App, connect: ClientFactory, user: str, terminal: TerminalFactory
) -> None:
    tty = await terminal(app, user)
    await tty.expect("Name \\[Ava\\]:")
    tty.sendline("Juniper")
    await tty.expect("Personality .*\\[friendly\\]:")
    tty.sendline("professional")
    await tty.expect("Talking to Juniper \\(professional\\)")
    await tty.expect("Juniper \\(professional\\): Good day. How can I assist you today\\?")
    avatar = (await connect(user)).welcome["avatar"]
    assert (avatar["name"], avatar["personality"]) == ("Juniper", "professional")


async def test_quit_exits_0(
    app: App, connect: ClientFactory, user: str, terminal: TerminalFactory
) -> None:
    await with_avatar(await connect(user))
    tty = await terminal(app, user)
    await tty.expect("\\[friendly\\]")
    tty.sendline("/quit")
    assert await tty.exit_code() == 0


async def test_ctrl_d_exits_0(
    app: App, connect: ClientFactory, user: str, terminal: TerminalFactory
) -> None:
    await with_avatar(await connect(user))
    tty = await terminal(app, user)
    await tty.expect("\\[friendly\\]")
    tty.child.sendeof()
    assert await tty.exit_code() == 0


async def test_tab_completes_persona_prefix_to_the_single_match(
    app: App, connect: ClientFactory, user: str, terminal: TerminalFactory
) -> None:
    await with_avatar(await connect(user), "friendly")
    tty = await terminal(app, user)
    await tty.expect("\\[friendly\\]")
    tty.send("/persona w\t\r")  # Tab and Enter at once: no menu needs to be drawn first
    await tty.expect("persona: witty \\(was friendly\\)")
    await tty.expect("\\[witty\\]")


async def test_personas_pages_a_long_catalogue(
    make_app: AppFactory,
    connect: ClientFactory,
    user: str,
    terminal: TerminalFactory,
    extra_personas: ExtraPersonas,
) -> None:
    await extra_personas(45)  # 51 with the six built-in ones
    app = await make_app()
    await with_avatar(await connect(user, target=app))
    tty = await terminal(app, user)
    await tty.expect("\\[friendly\\]")
    tty.sendline("/personas")
    await tty.expect("51 personas, page 1 of 3 \\(1-20\\):")
    await tty.expect("extra-0014 ")
    await tty.expect("/personas more for page 2")
    tty.sendline("/personas more")
    await tty.expect("51 personas, page 2 of 3 \\(21-40\\):")
    await tty.expect("extra-0034 ")
    await tty.expect("/personas more for page 3")
    tty.sendline("/personas 3")
    await tty.expect("51 personas, page 3 of 3 \\(41-51\\):")
    await tty.expect("extra-0045 ")
    await tty.expect("\\(the last page\\)")


async def test_tab_completes_a_persona_among_hundreds(
    make_app: AppFactory,
    connect: ClientFactory,
    user: str,
    terminal: TerminalFactory,
    extra_personas: ExtraPersonas,
) -> None:
    await extra_personas(300)
    app = await make_app()
    await with_avatar(await connect(user, target=app), "friendly")
    tty = await terminal(app, user)
    await tty.expect("\\[friendly\\]")
    tty.send("/persona w\t\r")  # still the one match
    await tty.expect("persona: witty \\(was friendly\\)")
    await tty.expect("\\[witty\\]")
    tty.send("/persona extra-030\t\r")  # extra-0300 alone among extra-0001 to extra-0300
    await tty.expect("persona: extra-0300 \\(was witty\\)")
    await tty.expect("\\[extra-0300\\]")


async def test_reconnects_after_a_server_restart_keeping_the_typed_text(
    make_app: AppFactory, connect: ClientFactory, user: str, terminal: TerminalFactory
) -> None:
    app = await make_app()
    await with_avatar(await connect(user, target=app))
    tty = await terminal(app, user)
    await tty.expect("\\[friendly\\]")
    tty.send("I baked")
    await tty.expect("I baked")
    port = app.port
    await app.stop()
    await tty.expect("connection lost \\(the server is shutting down\\): reconnecting")
    await tty.expect("\\(offline\\)")  # in the prompt, until the connection is back
    again = await make_app(port=port)
    await tty.expect("reconnected")
    tty.sendline(" bread today")
    await tty.expect("Ava \\(friendly\\): ")
    await tty.expect("\\[friendly\\]")
    history = await history_of(await connect(user, target=again))
    assert history[-2] == ("user", "friendly", "I baked bread today")


async def test_chat_typed_while_disconnected_is_sent_once_reconnected(
    make_app: AppFactory, connect: ClientFactory, user: str, terminal: TerminalFactory
) -> None:
    app = await make_app()
    await with_avatar(await connect(user, target=app), "caring")
    tty = await terminal(app, user)
    await tty.expect("\\[caring\\]")
    port = app.port
    await app.stop()
    await tty.expect("reconnecting")
    tty.sendline("sent while away")
    await tty.expect("not connected: it will be sent once the connection is back")
    again = await make_app(port=port)
    await tty.expect("reconnected")
    await tty.expect("Ava \\(caring\\): ")
    await tty.expect("\\[caring\\]")
    history = await history_of(await connect(user, target=again))
    assert history[-2:][0] == ("user", "caring", "sent while away")
    assert history[-1][:2] == ("assistant", "caring")


async def test_persona_changed_while_disconnected_is_shown_on_reconnect(
    make_app: AppFactory, connect: ClientFactory, user: str, terminal: TerminalFactory
) -> None:
    app = await make_app()
    await with_avatar(await connect(user, target=app), "friendly")
    tty = await terminal(app, user)
    await tty.expect("\\[friendly\\]")
    port = app.port
    await app.stop()
    await tty.expect("reconnecting")
    again = await make_app(port=port)
    client = await connect(user, target=again)
    await client.request({"type": "set_persona", "personality": "playful"})
    await tty.expect("reconnected; the persona is now playful")
    await tty.expect("\\[playful\\]")


async def test_text_from_the_server_cannot_drive_the_terminal(
    make_app: AppFactory, connect: ClientFactory, user: str, tmp_path: Path, database_url: str
) -> None:
    """A card (or a model) is someone else's text: its escape sequences are shown, not run."""
    title = "\x1b]0;owned\x07"  # would set the terminal's title
    card = minimal_card(f"Mallory{title}", f"Clears your screen\x1b[2J\x9b31m, red{title}")
    card["data"] = {**card["data"], "first_mes": f"Hi\x1b[1A{title}"}  # type: ignore[dict-item]
    [mallory] = await add_personas(database_url, 1, f"esc{uuid.uuid4().hex[:6]}", [card])
    app = await make_app()
    client = await connect(user, target=app)
    answer = await client.request({"type": "create_avatar", "name": "Ava", "personality": mallory})
    assert answer["greeting"] == f"Hi\x1b[1A{title}"  # the server sends the text as written
    token = mint_token(SECRET, user)
    result = await run_piped(tmp_path, ["--url", app.url, "--token", token], "/personas\nhi\n")
    assert result.code == 0, result.stderr
    assert not any(char in result.stdout for char in "\x1b\x07\x9b"), result.stdout
    assert "Clears your screen\\x1b[2J\\x9b31m, red\\x1b]0;owned\\x07" in result.stdout
    assert printable("a\tb\nc\rd\x7f") == "a\tb\nc\\x0dd\\x7f"
