"""The store against a real PostgreSQL: migrations, the catalogue constraint, group commit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, cast

import asyncpg
import pytest
from pydantic import ValidationError

from protocol.conversation.records import StoredTurn, SwitchRequest, SwitchResult, Turn
from protocol.errors import AvatarExists, InvalidPersona, Unavailable
from server.batching import Batcher, settle
from server.logs import Throttled
from server.settings import Settings
from server.store import Store, connections
from server.store.connections import Conn, PoolConnection, unreachable_is_unavailable, usable
from tests.personas import BUILTIN_IDS, add_personas

BATCHES: list[int] = []  # the size of every batch of turns the `store` fixture wrote


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    store = await Store.connect(database_url, min_size=1, max_size=4, on_batch=BATCHES.append)
    await store.migrate()
    yield store
    await store.close()


async def set_persona(store: Store, user: str, personality: str) -> SwitchResult | None:
    """One switch through the group commit, awaited."""
    # None (no avatar) is a result, which settle() passes on as it is
    future: asyncio.Future[SwitchResult] = asyncio.get_running_loop().create_future()
    store.add_switch(SwitchRequest(user, personality, ""), settle(future))
    return await future


async def commit_turn(store: Store, turn: Turn) -> StoredTurn:
    """One turn through the group commit, awaited."""
    future: asyncio.Future[StoredTurn] = asyncio.get_running_loop().create_future()
    store.add_turn(turn, settle(future))
    return await future


def _user() -> str:
    return f"store-{uuid.uuid4().hex[:12]}"


async def test_database_accepts_every_catalogue_persona(store: Store) -> None:
    for persona in BUILTIN_IDS:
        user = _user()
        await store.open_user(user)
        avatar = await store.create_avatar(user, "Ava", persona)
        assert avatar.personality == persona


async def test_an_avatar_is_created_only_with_an_enabled_persona(
    store: Store, database_url: str
) -> None:
    [extra] = await add_personas(database_url, 1, f"c{uuid.uuid4().hex[:8]}")
    await _set_enabled(database_url, extra, False)
    for persona in ("grumpy", extra):
        user = _user()
        await store.open_user(user)
        with pytest.raises(InvalidPersona, match="not available"):
            await store.create_avatar(user, "Ava", persona)
        assert await store.get_avatar(user) is None
    user = _user()
    await store.open_user(user)
    await store.create_avatar(user, "Ava", "witty")
    with pytest.raises(AvatarExists):  # still told apart from a refused persona
        await store.create_avatar(user, "Ava", "witty")


async def test_a_switch_to_a_persona_not_enabled_is_refused_and_the_batch_goes_on(
    store: Store, database_url: str
) -> None:
    """A switch checked against an old copy of the catalogue: the statement refuses it, alone."""
    [extra] = await add_personas(database_url, 1, f"s{uuid.uuid4().hex[:8]}")
    users = [_user() for _ in range(3)]
    for user in users:
        await store.open_user(user)
        await store.create_avatar(user, "Ava", "friendly")
    await _set_enabled(database_url, extra, False)
    answers, done = _answers()
    for user, persona in zip(users, ("witty", extra, "grumpy"), strict=True):
        store.add_switch(SwitchRequest(user, persona, ""), done)
    await store.drain()
    assert isinstance(answers[0], SwitchResult) and answers[0].avatar.personality == "witty"
    assert all(isinstance(answer, InvalidPersona) for answer in answers[1:])
    assert [(await store.get_avatar(u)).personality for u in users[1:]] == ["friendly"] * 2  # type: ignore[union-attr]


async def _set_enabled(dsn: str, persona: str, enabled: bool) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "UPDATE personas SET enabled = $2, version = version + 1 WHERE id = $1",
            persona,
            enabled,
        )
    finally:
        await conn.close()


async def test_concurrent_migrations_apply_each_file_once(database_url: str, store: Store) -> None:
    stores = [await Store.connect(database_url, min_size=1, max_size=1) for _ in range(3)]
    try:
        results = await asyncio.gather(*(s.migrate() for s in stores))
    finally:
        for other in stores:
            await other.close()
    assert results == [[], [], []]
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT version, count(*) FROM schema_migrations GROUP BY version")
    finally:
        await conn.close()
    assert all(row["count"] == 1 for row in rows)
    assert {row["version"] for row in rows} >= {1}


async def test_set_persona_returns_previous_and_bumps_version(store: Store) -> None:
    user = _user()
    await store.open_user(user)
    created = await store.create_avatar(user, "Ava", "friendly")
    result = await set_persona(store, user, "witty")
    assert result is not None
    avatar, previous = result.avatar, result.previous
    assert (avatar.personality, previous, avatar.version) == (
        "witty",
        "friendly",
        created.version + 1,
    )


async def test_set_persona_without_avatar_returns_none(store: Store) -> None:
    user = _user()
    await store.open_user(user)
    assert await set_persona(store, user, "witty") is None


async def test_concurrent_turns_share_group_commits(store: Store) -> None:
    user = _user()
    await store.open_user(user)
    batches_before = len(BATCHES)
    turns = [
        Turn(
            user_id=user, persona="witty", user_text=f"q{i}", reply_text=f"a{i}", status="completed"
        )
        for i in range(50)
    ]
    stored = await asyncio.gather(*(commit_turn(store, t) for t in turns))
    assert all(s.inserted for s in stored)
    assert len({s.message_id for s in stored} | {s.reply_id for s in stored}) == 100
    assert len(BATCHES) - batches_before < 50
    history = await store.history(user, 100, None)
    pairs = {h.id: h.text for h in history}
    assert all(
        pairs[s.message_id] == f"q{i}" and pairs[s.reply_id] == f"a{i}"
        for i, s in enumerate(stored)
    )


async def test_turn_with_a_used_client_id_is_not_stored_twice(store: Store) -> None:
    user = _user()
    await store.open_user(user)
    turn = Turn(
        user_id=user,
        persona="caring",
        user_text="hi",
        reply_text="hello",
        status="completed",
        client_id="same",
    )
    first, second = await asyncio.gather(commit_turn(store, turn), commit_turn(store, turn))
    assert sorted([first.inserted, second.inserted]) == [False, True]
    assert len(await store.history(user, 100, None)) == 2


async def test_a_batch_meeting_a_stored_chat_writes_the_others_once(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """The batch's one INSERT fails on the stored chat's client id; written again, it keeps the
    stored chat and writes every other turn of the batch, once."""
    user = _user()
    await store.open_user(user)

    def turn(client_id: str, reply: str) -> Turn:
        return Turn(
            user_id=user,
            persona="witty",
            user_text=f"q-{client_id}",
            reply_text=reply,
            status="completed",
            client_id=client_id,
        )

    stored = await commit_turn(store, turn("c1", "first answer"))
    caplog.set_level(logging.DEBUG, logger="server.store")
    again, *others = await asyncio.gather(
        commit_turn(store, turn("c1", "second answer")),
        *(commit_turn(store, turn(f"n{i}", f"a{i}")) for i in range(5)),
    )
    assert stored.inserted and not again.inserted
    assert "a batch of 6 turns met a stored chat" in caplog.text
    assert all(other.inserted for other in others)
    texts = [entry.text for entry in await store.history(user, 100, None)]
    assert texts.count("first answer") == 1 and "second answer" not in texts
    assert len(texts) == 2 + 2 * 5
    assert sorted(texts[2:]) == sorted([f"q-n{i}" for i in range(5)] + [f"a{i}" for i in range(5)])


async def test_a_turn_the_database_refuses_fails_alone_in_its_batch(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """A value PostgreSQL cannot store (a NUL, which the conversation replaces before it gets
    here) failed the whole group commit: every other user's chat in it with it."""
    user = _user()
    await store.open_user(user)

    def turn(client_id: str, reply: str) -> Turn:
        return Turn(user, "witty", f"q-{client_id}", reply, "completed", client_id)

    bad, *good = await asyncio.gather(
        commit_turn(store, turn("bad", "a\x00b")),
        *(commit_turn(store, turn(f"g{i}", f"a{i}")) for i in range(3)),
        return_exceptions=True,
    )
    assert isinstance(bad, asyncpg.DataError), bad
    assert all(isinstance(one, StoredTurn) and one.inserted for one in good), good
    assert "a batch of 4 turns was refused" in caplog.text
    texts = [entry.text for entry in await store.history(user, 100, None)]
    assert sorted(texts) == sorted([f"q-g{i}" for i in range(3)] + [f"a{i}" for i in range(3)])


async def test_recent_messages_respect_count_and_characters(store: Store) -> None:
    user = _user()
    await store.open_user(user)
    for i in range(4):
        await commit_turn(
            store,
            Turn(
                user_id=user,
                persona="witty",
                user_text=f"q{i}",
                reply_text="a" * 10,
                status="completed",
            ),
        )
    recent = await store.recent_messages(user, 4, 1000)
    assert [(m.role, m.text) for m in recent] == [
        ("user", "q2"), ("assistant", "a" * 10), ("user", "q3"), ("assistant", "a" * 10),
    ]  # fmt: skip
    assert [m.text for m in await store.recent_messages(user, 4, 12)] == ["q3", "a" * 10]


async def test_batcher_hands_each_caller_its_own_result() -> None:
    batches: list[list[int]] = []

    async def flush(_: None, items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        await asyncio.sleep(0.01)
        return [item * 2 for item in items]

    batcher: Batcher[None, int, int] = Batcher(flush, contextlib.nullcontext)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.002)  # the first flush is in flight: the rest queue behind it
    results = await asyncio.gather(first, *(batcher.submit(i) for i in range(1, 10)))
    assert results == [i * 2 for i in range(10)]
    assert batches == [[0], list(range(1, 10))]


async def test_batcher_failure_reaches_every_caller_of_that_batch() -> None:
    async def flush(_: None, items: Sequence[int]) -> list[int]:
        raise RuntimeError("disk full")

    batcher: Batcher[None, int, int] = Batcher(flush, contextlib.nullcontext)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_concurrent_switches_share_statements_and_chain_previous(store: Store) -> None:
    users = [_user() for _ in range(5)]
    for user in users:
        await store.open_user(user)
        await store.create_avatar(user, "Ava", "friendly")
    first = users[0]
    wanted = [(u, "witty") for u in users] + [(first, "caring"), (first, "playful")]
    results = await asyncio.gather(*(set_persona(store, u, p) for u, p in wanted))
    assert all(r is not None for r in results)
    mine = [r for (u, _), r in zip(wanted, results, strict=True) if u == first and r is not None]
    chain = [(r.avatar.personality, r.previous, r.newest) for r in mine]
    assert chain == [
        ("witty", "friendly", False), ("caring", "witty", False), ("playful", "caring", True),
    ]  # fmt: skip
    avatar = await store.get_avatar(first)
    assert avatar is not None and (avatar.personality, avatar.version) == ("playful", 4)


def _answers() -> tuple[list[object], Callable[[object, BaseException | None], None]]:
    """A list, and a batcher callback that appends each item's result (or error) to it."""
    answers: list[object] = []
    return answers, lambda result, error: answers.append(error if error is not None else result)


async def _messages(store: Store, user: str) -> list[tuple[str, str]]:
    return [(m.role, m.persona) for m in await store.history(user, 10, None)]


def _turn(user: str, persona: str, text: str = "hi") -> Turn:
    return Turn(user, persona, text, f"{persona} says hello", "completed", client_id=text)


async def test_concurrent_avatar_loads_each_get_their_own(store: Store) -> None:
    users = [_user() for _ in range(4)]
    for user, persona in zip(users, BUILTIN_IDS, strict=False):
        await store.open_user(user)
        await store.create_avatar(user, "Ava", persona)
    loaded = await asyncio.gather(*(store.get_avatar(u) for u in [*users, users[0], "nobody"]))
    assert [a.personality if a else None for a in loaded] == [
        *BUILTIN_IDS[:4],
        BUILTIN_IDS[0],
        None,
    ]


async def test_batcher_keeps_one_resource_while_batches_keep_coming() -> None:
    opened: list[int] = []

    @contextlib.asynccontextmanager
    async def open_resource() -> AsyncIterator[int]:
        opened.append(len(opened))
        yield opened[-1]

    async def flush(resource: int, items: Sequence[int]) -> list[int]:
        await asyncio.sleep(0.005)
        return [resource] * len(items)

    batcher: Batcher[int, int, int] = Batcher(flush, open_resource)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.001)  # queued behind the first flush: the same resource serves them
    results = await asyncio.gather(first, *(batcher.submit(i) for i in range(1, 5)))
    assert results == [0] * 5
    assert opened == [0]
    assert await batcher.submit(9) == 1  # nothing was waiting: the next run opens afresh


async def test_a_hand_out_asked_for_while_the_runner_leaves_is_not_left_waiting() -> None:
    """The turns' batcher waits for the switches' next hand-out (at most 100 ms). Asked for
    while the switches' runner released its connection after its last batch, it used to be
    handed out never: every batch of turns then waited the whole 100 ms."""
    leaving, released = asyncio.Event(), asyncio.Event()

    @contextlib.asynccontextmanager
    async def open_resource() -> AsyncIterator[int]:
        yield 1
        leaving.set()
        await released.wait()  # a pool's release yields too

    async def flush(resource: int, items: Sequence[int]) -> list[int]:
        return list(items)

    batcher: Batcher[int, int, int] = Batcher(flush, open_resource)
    submitted = asyncio.ensure_future(batcher.submit(7))
    await leaving.wait()
    waiting = batcher.next_hand_out()
    assert waiting is not None and not waiting.done()
    released.set()
    assert await submitted == 7
    async with asyncio.timeout(1):
        await waiting
    assert batcher.next_hand_out() is None  # idle now


async def test_batcher_without_a_resource_fails_that_batch_and_recovers() -> None:
    broken = True

    @contextlib.asynccontextmanager
    async def open_resource() -> AsyncIterator[None]:
        if broken:
            raise Unavailable("the database is unreachable")
        yield None

    async def flush(_: None, items: Sequence[int]) -> list[int]:
        return list(items)

    batcher: Batcher[None, int, int] = Batcher(flush, open_resource)
    answers: list[tuple[int | None, BaseException | None]] = []
    for i in range(3):
        batcher.add(i, lambda result, error: answers.append((result, error)))
    await batcher.drain()
    assert len(answers) == 3 and all(isinstance(e, Unavailable) for _, e in answers)
    broken = False
    assert await batcher.submit(7) == 7


async def test_batcher_cancelled_while_opening_answers_every_caller() -> None:
    @contextlib.asynccontextmanager
    async def open_resource() -> AsyncIterator[None]:
        await asyncio.sleep(10)  # waiting for a pooled connection
        yield None

    async def flush(_: None, items: Sequence[int]) -> list[int]:
        return list(items)

    batcher: Batcher[None, int, int] = Batcher(flush, open_resource)
    answers: list[BaseException | None] = []
    batcher.add(1, lambda _, error: answers.append(error))
    waiting = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0.01)
    batcher.add(3, lambda _, error: answers.append(error))  # queued behind the first batch
    assert batcher._runner is not None
    batcher._runner.cancel()
    await asyncio.sleep(0.01)
    assert len(answers) == 2 and all(isinstance(e, asyncio.CancelledError) for e in answers)
    assert waiting.cancelled()


async def test_batcher_observer_failure_fails_only_its_batch() -> None:
    async def flush(_: None, items: Sequence[int]) -> list[int]:
        return list(items)

    def observe(size: int) -> None:
        raise ValueError("metrics are broken")

    batcher: Batcher[None, int, int] = Batcher(flush, contextlib.nullcontext, observe=observe)
    answers: list[BaseException | None] = []
    batcher.add(1, lambda _, error: answers.append(error))
    await batcher.drain()
    assert len(answers) == 1 and isinstance(answers[0], ValueError)


def test_a_pool_too_small_for_the_three_group_commits_is_refused() -> None:
    with pytest.raises(ValidationError, match="db_pool_max"):
        Settings(db_pool_max=3)
    assert Settings(db_pool_max=4).db_pool_max == 4


async def test_a_switch_held_up_by_a_row_lock_holds_up_no_other_users_turns(
    store: Store, database_url: str
) -> None:
    user, other = _user(), _user()
    for name in (user, other):
        await store.open_user(name)
        await store.create_avatar(name, "Ava", "friendly")
    locker = await asyncpg.connect(database_url)
    try:
        locking = locker.transaction()
        await locking.start()
        await locker.execute("SELECT 1 FROM avatars WHERE user_id = $1 FOR UPDATE", user)
        switched, on_switch = _answers()
        unrelated: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        store.add_switch(SwitchRequest(user, "witty", ""), on_switch)
        store.add_turn(
            _turn(other, "friendly", "unrelated"),
            lambda result, error: unrelated.set_result(error or result),
        )
        assert isinstance(await asyncio.wait_for(unrelated, 3), StoredTurn)
        assert switched == []  # the switch still waits for the lock
        await locking.rollback()
    finally:
        await locker.close()
    await store.drain()
    assert isinstance(switched[0], SwitchResult)
    avatar = await store.get_avatar(user)
    assert avatar is not None and avatar.personality == "witty"


def _idle_backend_ended(conn: Conn) -> None:
    """What `conn` receives when PostgreSQL ends its backend while it is idle (the postmaster
    died, pg_terminate_backend, a shutdown): a FATAL error, before the socket closes."""
    fields = b"SFATAL\0VFATAL\0C57P01\0Mterminating connection due to administrator command\0\0"
    protocol = cast(Any, conn)._con._protocol
    protocol.data_received(b"E" + (len(fields) + 4).to_bytes(4, "big") + fields)


async def _held_over_two_batches(
    database_url: str,
    between: Callable[[Conn], Awaitable[None]],
    first_query: str = "SELECT unnest($1::int[]) AS n",
    command_timeout: float = 5.0,
) -> tuple[list[int | BaseException], list[int], int]:
    """Two batches through a batcher of `Store._fetch` on one pool: the second queued while
    the first is written, so that the connection of the first is held for it; `between` runs
    on that connection after the first batch's statement. The two results, the backend of
    every flush, and how many batches went again."""
    pool = await asyncpg.create_pool(
        database_url,
        min_size=2,
        max_size=2,
        connection_class=PoolConnection,
        command_timeout=command_timeout,
    )
    store = Store(pool, 5.0)
    backends: list[int] = []

    async def flush(conn: Conn, items: Sequence[int]) -> list[int]:
        backends.append(conn.get_server_pid())
        query = first_query if not backends[1:] else "SELECT unnest($1::int[]) AS n"
        rows = await store._fetch(conn, query, list(items))
        if len(backends) == 1:
            await between(conn)
        return [row["n"] for row in rows]

    batcher: Batcher[Conn, int, int] = Batcher(flush, store._connection, usable=usable)
    try:
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0)  # the first flush is under way: the second batch waits for it
        results = await asyncio.wait_for(
            asyncio.gather(first, batcher.submit(2), return_exceptions=True), 10
        )
    finally:
        await pool.close()
    return list(results), backends, batcher.retries


async def test_a_batch_on_a_connection_the_database_ended_while_held_goes_on_another(
    database_url: str,
) -> None:
    """The database ended the held connection between two batches, and asyncpg has seen its
    FATAL error but not yet the socket close: the second batch's statement cannot start on it
    ("cannot switch to state 12; another operation (2) is in progress", issue #19); nothing of
    it was sent, so it is written on another connection, and its caller never knows."""

    async def ended(conn: Conn) -> None:
        _idle_backend_ended(conn)

    results, backends, retries = await _held_over_two_batches(database_url, ended)
    assert results == [1, 2]
    assert retries == 1
    assert backends[:2] == [backends[0]] * 2 and backends[2] != backends[0]


async def test_a_held_connection_whose_socket_closed_is_not_used_again(database_url: str) -> None:
    """pg_terminate_backend ends the held connection for real, and asyncpg sees it close (and
    hands it back to the pool) before the next batch: that batch gets a fresh connection."""

    async def terminated(conn: Conn) -> None:
        pid = conn.get_server_pid()
        other = await asyncpg.connect(database_url)
        try:
            assert await other.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await other.close()
        async with asyncio.timeout(10):
            while usable(conn):
                await asyncio.sleep(0.01)

    results, backends, retries = await _held_over_two_batches(database_url, terminated)
    assert results == [1, 2]
    assert retries == 0
    assert len(backends) == 2 and backends[1] != backends[0]


async def test_a_batch_whose_statement_timed_out_leaves_the_next_one_a_fresh_connection(
    database_url: str,
) -> None:
    """The other way a connection could be left busy: a statement cut off by the command
    timeout (asyncpg cancels it on the server). That batch fails as `Unavailable`, and the
    batcher lets go of the connection: the pool takes it back once the cancel is done, and the
    next batch, queued meanwhile, gets one from the pool (that one, idle again, or another)."""

    async def nothing(conn: Conn) -> None:
        raise AssertionError("the first batch cannot succeed")

    results, backends, retries = await _held_over_two_batches(
        database_url, nothing, "SELECT n FROM unnest($1::int[]) AS n, pg_sleep(5)", 0.2
    )
    assert isinstance(results[0], Unavailable) and results[1] == 2
    assert retries == 0 and len(backends) == 2


async def test_a_statement_on_an_ended_connection_is_unavailable_in_one_line(
    database_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside a batch, such a statement fails as `Unavailable`, logged as a lost connection
    in one line, without a traceback: the outage is handled, not a bug."""
    monkeypatch.setattr(connections, "_outage", Throttled(connections.log))  # not held back
    pool = await asyncpg.create_pool(
        database_url, min_size=1, max_size=1, connection_class=PoolConnection
    )
    try:
        async with pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
            _idle_backend_ended(conn)
            with (
                caplog.at_level(logging.WARNING, "server.store"),
                pytest.raises(Unavailable),
                unreachable_is_unavailable(conn),
            ):
                await conn.fetchval("SELECT 1")
    finally:
        await pool.close()
    lost = [r for r in caplog.records if r.name == "server.store"]
    assert [r.getMessage() for r in lost] == ["database connection lost: the server had ended it"]
    assert not lost[0].exc_info
