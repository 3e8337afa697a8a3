"""`run.py personas ...` as a user runs it, against the suite's PostgreSQL, with real servers."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from protocol.cards import export_card
from server.card_files import read_card_file
from server.notify import APPLICATION_NAME
from server.store.store import migrate_database
from tests.client import login
from tests.conftest import SECRET, AppFactory, with_avatar
from tests.processes import ROOT, Served, clean_env, run_py, serve

CARDS = ROOT / "tests" / "fixtures" / "cards"
CONFIRMED = re.compile(r"confirmed by (\d+) server process(?:es)?")


def _sfx() -> str:
    return uuid.uuid4().hex[:8]


async def personas(database_url: str, *args: str) -> tuple[int, str, str]:
    return await run_py("personas", *args, env=clean_env(DATABASE_URL=database_url))


def _one_error_line(err: str) -> str:
    """stderr of a refusal: one `error: ...` line, and no traceback."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


async def _listeners(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE $1",
            f"{APPLICATION_NAME}:%",
        )
        return count
    finally:
        await conn.close()


async def _settled(database_url: str, expected: int) -> None:
    """Wait until exactly `expected` server processes listen (those of earlier tests are gone)."""
    for _ in range(200):
        if await _listeners(database_url) == expected:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{await _listeners(database_url)} listeners, expected {expected}")


def _field(shown: str, key: str) -> str:
    """A field of `personas show`."""
    match = re.search(rf"^{key}:[ ]+(.*)$", shown, re.M)
    assert match, shown
    return match.group(1)


def _confirmed(out: str) -> int:
    match = CONFIRMED.search(out)
    assert match, out
    return int(match.group(1))


def _project_card(tmp_path: Path, persona_id: str, line: str) -> Path:
    """A project card file whose template replies always open and end with `line`."""
    path = tmp_path / f"{persona_id}-{uuid.uuid4().hex[:6]}.json"
    card = {
        "persona_chat_card": 1,
        "id": persona_id,
        "card": {
            "spec": "chara_card_v3",
            "spec_version": "3.0",
            "data": {
                "name": f"Tester {persona_id}",
                "description": "A persona of the CLI tests.",
                "extensions": {
                    "persona_chat": {"openers": [f"Open {line}."], "sign_off": f"Bye {line}."}
                },
            },
        },
    }
    path.write_text(json.dumps(card), encoding="utf-8")
    return path


@pytest.fixture
async def served(database_url: str, tmp_path: Path) -> AsyncIterator[Served]:
    """A `run.py serve` process on the suite's database."""
    env = clean_env(DATABASE_URL=database_url, CHAT_JWT_SECRET=SECRET)
    server = await serve(log_path=tmp_path / "serve.log", env=env)
    try:
        yield server
    finally:
        assert await server.stop() == 0
        text = (tmp_path / "serve.log").read_text()
        assert "Traceback" not in text and " ERROR " not in text, text[-3000:]


# ------------------------------------------------------------------------------ reading


async def test_list_shows_the_personas_and_the_avatars_using_them(
    database_url: str, make_app: AppFactory
) -> None:
    app = await make_app()
    client = await login(app.url, SECRET, f"user-{_sfx()}")
    try:
        await with_avatar(client, "caring")
    finally:
        await client.__aexit__(None, None, None)
    code, out, err = await personas(database_url, "list")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "VERSION", "ENABLED", "AVATARS"]
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert {"friendly", "playful", "caring", "witty", "professional", "romantic"} <= set(rows)
    assert rows["caring"][1] == "Caring" and rows["caring"][3] in ("yes", "no")
    assert int(rows["caring"][-1]) >= 1
    assert re.fullmatch(r"\d+ personas, \d+ enabled", lines[-1])


async def test_show_and_export_of_an_unknown_id_say_so(database_url: str) -> None:
    for action in ("show", "export", "enable", "disable", "remove"):
        code, _, err = await personas(database_url, action, "no-such-one")
        assert code == 1
        assert "no-such-one: no such persona" in _one_error_line(err)


# ------------------------------------------------------------------------------ import, export

SAMPLES = ["v2_wren.json", "v3_mirela.json", "v3_mirela.png", "v1_tobias.json", "bramble.toml"]


@pytest.mark.parametrize("sample", SAMPLES)
async def test_import_then_export_gives_the_card_back(
    database_url: str, tmp_path: Path, sample: str
) -> None:
    path = CARDS / sample
    persona_id = f"{path.stem.replace('_', '-')}-{_sfx()}"
    await _settled(database_url, 0)
    code, out, err = await personas(database_url, "import", str(path), "--id", persona_id)
    assert code == 0, err
    assert f"{persona_id}: imported {path}" in out and "saved as version 1" in out
    assert "confirmed by 0 server processes (none is running)" in out
    if sample.startswith("v1"):
        assert f"{path}: note: no spec: read as a Character Card V1" in out

    parsed = read_card_file(path)
    code, exported, err = await personas(database_url, "export", persona_id)
    assert code == 0, err
    card = json.loads(exported)
    if sample.endswith(".json") and not sample.startswith("v1"):
        # the same JSON object: unknown fields and extensions unchanged
        assert card == json.loads(path.read_text(encoding="utf-8"))
    expected = "v3" if parsed.spec == "v1" else parsed.spec
    assert card == export_card(parsed, expected)
    for spec in ("v2", "v3"):
        code, other, err = await personas(database_url, "export", persona_id, "--format", spec)
        assert code == 0, err
        assert json.loads(other) == export_card(parsed, spec)
    if sample == "v3_mirela.png":  # the PNG carries the V3 JSON card
        assert card == json.loads((CARDS / "v3_mirela.json").read_text(encoding="utf-8"))

    png, project = tmp_path / "out.png", tmp_path / "out.json"
    code, out, err = await personas(database_url, "export", persona_id, "--out", str(png))
    assert code == 0 and str(png) in out, err
    assert export_card(read_card_file(png), "v3") == export_card(parsed, "v3")
    code, out, err = await personas(
        database_url, "export", persona_id, "--format", "project", "--out", str(project)
    )
    assert code == 0, err
    again = read_card_file(project)
    assert again.id == persona_id and again.enabled
    assert export_card(again, "v3") == export_card(parsed, "v3")

    code, shown, err = await personas(database_url, "show", persona_id)
    assert code == 0, err
    assert _field(shown, "name") == parsed.name and _field(shown, "id") == persona_id
    assert (_field(shown, "version"), _field(shown, "enabled")) == ("1", "yes")


async def test_a_project_file_gives_its_own_id_and_a_card_its_name(database_url: str) -> None:
    code, out, err = await personas(
        database_url, "import", str(CARDS / "bramble.toml"), "--dry-run"
    )
    assert code == 0, err
    assert "professor-bramble: would be imported" in out or "would be replaced" in out
    assert out.strip().endswith("dry run: nothing was written")


async def test_dry_run_writes_nothing(database_url: str) -> None:
    persona_id = f"dry-{_sfx()}"
    files = [str(CARDS / "v2_wren.json")]
    code, out, err = await personas(database_url, "import", *files, "--id", persona_id, "--dry-run")
    assert code == 0, err
    assert f"{persona_id}: would be imported {files[0]} (V2 card), as version 1" in out
    assert "dry run: nothing was written" in out and "confirmed" not in out
    code, _, err = await personas(database_url, "show", persona_id)
    assert code == 1 and "no such persona" in err


async def test_a_bad_file_among_several_imports_nothing(database_url: str, tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(
        json.dumps({"spec": "chara_card_v2", "data": {"name": f"Good {_sfx()}"}}), encoding="utf-8"
    )
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"spec": "chara_card_v2", "data": {"name": "Bad", "tags": ["a", 5]}}),
        encoding="utf-8",
    )
    good_id = read_card_file(good).persona_id
    code, out, err = await personas(database_url, "import", str(good), str(bad))
    assert code == 1 and out == ""
    assert "Traceback" not in err
    assert err.splitlines() == [
        f"error: {bad}: data.tags[1]: expected a string",
        "error: 1 of 2 files is not a valid card: nothing was imported",
    ]
    code, _, _ = await personas(database_url, "show", good_id)
    assert code == 1

    # a file refused by the database (its id is taken) takes the others back with it
    taken = _project_card(tmp_path, f"taken-{_sfx()}", "taken")
    code, _, err = await personas(database_url, "import", str(taken))
    assert code == 0, err
    code, out, err = await personas(database_url, "import", str(good), str(taken))
    assert code == 1 and out == ""
    assert f"{taken}: the id taken-" in _one_error_line(err)
    code, _, _ = await personas(database_url, "show", good_id)
    assert code == 1


async def test_not_a_card_is_one_line(database_url: str, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"\xff\xfe not a card")
    code, _, err = await personas(database_url, "import", str(notes))
    assert code == 1
    assert f"error: {notes}: not a JSON, PNG or TOML card" in err
    code, _, err = await personas(database_url, "import", str(tmp_path / "missing.json"))
    assert code == 1 and "missing.json: cannot read the file" in err


async def test_a_taken_slug_is_refused_and_replace_bumps_the_version(database_url: str) -> None:
    persona_id = f"wren-{_sfx()}"
    wren = str(CARDS / "v2_wren.json")
    code, _, err = await personas(database_url, "import", wren, "--id", persona_id)
    assert code == 0, err
    created = _field((await personas(database_url, "show", persona_id))[1], "created")
    code, out, err = await personas(database_url, "import", wren, "--id", persona_id)
    assert code == 1 and out == ""
    line = _one_error_line(err)
    assert wren in line and f"the id {persona_id} is taken" in line and "--replace" in line

    code, out, err = await personas(database_url, "import", str(CARDS / "v3_mirela.json"),
                                    "--id", persona_id, "--replace")  # fmt: skip
    assert code == 0, err
    assert f"{persona_id}: replaced by" in out and "saved as version 2" in out
    code, shown, _ = await personas(database_url, "show", persona_id)
    assert _field(shown, "version") == "2" and _field(shown, "name") == "Mirela Quill"
    assert _field(shown, "created") == created
    code, _, err = await personas(database_url, "import", wren, str(wren), "--id", persona_id)
    assert code == 1 and "--id names the persona of one file" in _one_error_line(err)


async def test_enable_and_disable(database_url: str) -> None:
    persona_id = f"toggle-{_sfx()}"
    code, _, err = await personas(
        database_url, "import", str(CARDS / "v2_wren.json"), "--id", persona_id
    )
    assert code == 0, err
    code, out, err = await personas(database_url, "disable", persona_id)
    assert code == 0, err
    assert out.startswith(f"{persona_id}: disabled, saved as version 2; confirmed by ")
    code, out, _ = await personas(database_url, "disable", persona_id)
    assert (code, out) == (0, f"{persona_id}: already disabled (version 2): nothing to do\n")
    code, out, _ = await personas(database_url, "list")
    row = next(line.split() for line in out.splitlines() if line.startswith(persona_id + " "))
    assert row[-3:] == ["2", "no", "0"]
    code, out, err = await personas(database_url, "enable", persona_id)
    assert code == 0 and f"{persona_id}: enabled, saved as version 3" in out, err


# ------------------------------------------------------------------------------ with servers


async def test_remove_is_refused_while_used_and_reassigns_with_running_servers(
    database_url: str, make_app: AppFactory, served: Served, tmp_path: Path
) -> None:
    app = await make_app()
    await _settled(database_url, 2)
    persona_id = f"gone-{_sfx()}"
    code, out, err = await personas(
        database_url, "import", str(_project_card(tmp_path, persona_id, "gone")), "--id", persona_id
    )
    assert code == 0 and _confirmed(out) == 2, (out, err)
    user = f"user-{_sfx()}"
    here = await login(app.url, SECRET, user)
    there = await login(served.url, SECRET, user)  # the same user, on the other process
    try:
        await with_avatar(here, persona_id)
        reply = await there.request({"type": "chat", "text": "hello"})
        assert (reply["type"], reply["persona"]) == ("reply", persona_id), reply

        code, out, err = await personas(database_url, "remove", persona_id)
        assert code == 1 and out == ""
        assert f"{persona_id}: 1 avatar uses it" in _one_error_line(err)
        assert "--reassign" in err
        code, _, err = await personas(database_url, "remove", persona_id, "--reassign", "nope-x")
        assert code == 1 and "--reassign nope-x: no such persona" in _one_error_line(err)

        code, out, err = await personas(database_url, "remove", persona_id, "--reassign", "caring")
        assert code == 0, err
        assert out.startswith(f"{persona_id}: removed, 1 avatar moved to caring; confirmed by 2 ")
        for client in (here, there):
            changed = await client.recv_type("persona_changed")
            assert (changed["personality"], changed["previous"]) == ("caring", persona_id)
            reply = await client.request({"type": "chat", "text": "still there?"})
            assert (reply["type"], reply["persona"]) == ("reply", "caring"), reply
        code, _, _ = await personas(database_url, "show", persona_id)
        assert code == 1
    finally:
        for client in (here, there):
            await client.__aexit__(None, None, None)


async def test_remove_under_concurrent_switches_leaves_no_avatar_on_it(
    database_url: str, make_app: AppFactory, tmp_path: Path
) -> None:
    """Switches to the persona race its removal: each lands before (and is reassigned) or is
    refused after, and no avatar is left on a persona that is gone."""
    app = await make_app(rate_per_s=100000, rate_burst=100000)
    persona_id = f"raced-{_sfx()}"
    code, _, err = await personas(
        database_url, "import", str(_project_card(tmp_path, persona_id, "raced"))
    )
    assert code == 0, err
    users = [f"user-{_sfx()}" for _ in range(4)]
    clients = [await login(app.url, SECRET, user) for user in users]
    stop = asyncio.Event()
    answers: list[dict[str, object]] = []

    async def switch(client: Any) -> None:
        await with_avatar(client, "friendly")
        while not stop.is_set():
            for target in (persona_id, "professional"):
                frame = {"type": "set_persona", "personality": target}
                answers.append(await client.request(frame))

    left: list[int] = []
    try:
        tasks = [asyncio.create_task(switch(client)) for client in clients]
        await asyncio.sleep(0.3)
        code, out, err = await personas(database_url, "remove", persona_id, "--reassign", "caring")
        conn = await asyncpg.connect(database_url)
        try:  # while the switches go on: none lands on the persona that is gone
            for _ in range(5):
                left.append(
                    await conn.fetchval(
                        "SELECT count(*) FROM avatars WHERE personality = $1", persona_id
                    )
                )
                await asyncio.sleep(0.1)
        finally:
            await conn.close()
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        for client in clients:
            await client.__aexit__(None, None, None)
    assert code == 0 and f"{persona_id}: removed" in out, err
    assert left == [0] * 5
    kinds = {(a["type"], a.get("code")) for a in answers}
    assert kinds <= {("persona_set", None), ("error", "invalid_persona")}, kinds
    assert ("error", "invalid_persona") in kinds  # some came after the removal


async def test_an_acknowledged_edit_is_in_the_next_reply_and_a_disable_too(
    database_url: str, make_app: AppFactory, served: Served, tmp_path: Path
) -> None:
    await make_app()
    await _settled(database_url, 2)
    persona_id = f"edited-{_sfx()}"
    code, out, err = await personas(
        database_url, "import", str(_project_card(tmp_path, persona_id, "one"))
    )
    assert code == 0 and _confirmed(out) == 2, (out, err)
    client = await login(served.url, SECRET, f"user-{_sfx()}")
    try:
        await with_avatar(client, persona_id)
        reply = await client.request({"type": "chat", "text": "hello there"})
        assert "Bye one." in reply["text"] and "Open one." in reply["text"], reply

        edited = _project_card(tmp_path, persona_id, "two")
        code, out, err = await personas(database_url, "import", str(edited), "--replace")
        assert code == 0, err
        assert out.startswith(f"{persona_id}: replaced by {edited} (V3 card), saved as version 2")
        assert _confirmed(out) == 2
        reply = await client.request({"type": "chat", "text": "and now?"})
        assert "Bye two." in reply["text"] and "one." not in reply["text"], reply

        code, out, err = await personas(database_url, "disable", persona_id)
        assert code == 0 and _confirmed(out) == 2, err
        answer = await client.request({"type": "chat", "text": "are you there?"})
        assert (answer["type"], answer["code"]) == ("error", "persona_unavailable"), answer
    finally:
        await client.__aexit__(None, None, None)


async def test_a_process_that_does_not_confirm_is_named(database_url: str) -> None:
    persona_id = f"silent-{_sfx()}"
    await _settled(database_url, 0)
    deaf = await asyncpg.connect(  # looks like a server's listener, and never confirms
        database_url, server_settings={"application_name": f"{APPLICATION_NAME}:deaf-one"}
    )
    try:
        code, out, err = await personas(database_url, "import", str(CARDS / "v2_wren.json"),
                                        "--id", persona_id, "--timeout", "0.5")  # fmt: skip
    finally:
        await deaf.close()
    assert code == 1
    assert f"{persona_id}: imported" in out and "confirmed by 0 server processes" in out
    assert "(none is running)" not in out
    assert _one_error_line(err) == (
        "error: the edit is committed, but 1 server process did not confirm it within 0.5 s: "
        "deaf-one"
    )
    assert (await personas(database_url, "show", persona_id))[0] == 0


# ------------------------------------------------------------------------------ bad set-ups


async def test_a_database_that_is_down_is_one_line(tmp_path: Path, refused_url: str) -> None:
    port = refused_url.rsplit(":", 1)[1].split("/")[0]
    env = clean_env(DATABASE_URL=f"postgresql://u:p@127.0.0.1:{port}/db")
    code, out, err = await run_py("personas", "list", env=env)
    assert code == 1 and out == ""
    assert "cannot reach PostgreSQL at 127.0.0.1" in _one_error_line(err)
    code, out, err = await run_py("personas", "list", "--data-dir", str(tmp_path / "none"))
    assert code == 1 and "there is no database in" in _one_error_line(err)


async def test_usage_mistakes_exit_2(database_url: str) -> None:
    for args in (
        ("personas",),
        ("personas", "import"),
        ("personas", "export", "x", "--format", "v9"),
    ):
        code, _, err = await run_py(*args, env=clean_env(DATABASE_URL=database_url))
        assert code == 2 and err.startswith("error: "), err
    code, out, _ = await run_py("personas", "export", "--help")
    assert code == 0 and ".png" in out


async def test_a_cards_escape_sequences_are_shown_not_run(
    database_url: str, tmp_path: Path
) -> None:
    """A card is someone else's text: `list` and `show` print its control characters written
    out, so that it cannot drive the terminal of whoever looks at the catalogue."""
    title = "\x1b]0;owned\x07"
    card = {
        "spec": "chara_card_v3",
        "spec_version": "3.0",
        "data": {"name": f"[bold]Mallory{title}", "description": f"Clears\x1b[2J\x9b31m{title}"},
    }
    path = tmp_path / "mallory.json"
    path.write_text(json.dumps(card))
    await migrate_database(database_url, 10)  # the catalogue, should this test run first
    persona_id = f"esc-{uuid.uuid4().hex[:6]}"
    code, _, err = await personas(database_url, "import", str(path), "--id", persona_id)
    assert code == 0, err
    for action in (["list"], ["show", persona_id]):
        code, out, err = await personas(database_url, *action)
        assert code == 0, err
        assert not any(char in out for char in "\x1b\x07\x9b"), out
        assert "[bold]Mallory\\x1b]0;owned\\x07" in out
