"""The OpenAI-compatible generator: its SSE parsing, then end to end against a fake endpoint."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.frames import Usage
from server.app import App
from server.llm import OpenAIGenerator, display_url, env_proxy, failure_message
from server.render import persona_system_prompt, switch_note
from server.settings import ConfigError
from server.sse import MAX_LINE_BYTES, Completion, SseDecoder, StreamError, parse_chunk
from tests.client import Client, chat, first_delta
from tests.conftest import AppFactory, ClientFactory, settings_for_tests, with_avatar
from tests.personas import BUILTIN_CARDS, get_card
from tests.server.fake_llm import FakeLLM, Received, Script

OTHERS = {card.id: card for card in BUILTIN_CARDS}.get  # the catalogue's lookup, by id

FAST = {
    "generator": "openai",
    "llm_connect_timeout_s": 1.0,
    "llm_first_token_timeout_s": 0.5,
    "llm_idle_timeout_s": 0.3,
}
WHOLE = "Hello there, friend!"
KEY = "sk-test-0123456789abcdef"
SLOW = Script(tokens=("tok ",) * 100, token_delay_s=0.02)
CANCEL_CLOSE_S = 0.1


# ---------------------------------------------------------------- SSE parsing, no I/O


def decode(*chunks: bytes) -> list[str]:
    decoder = SseDecoder()
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    return events + decoder.close()


def test_sse_events_end_at_blank_lines() -> None:
    assert decode(b"data: one\n\ndata: two\n\n") == ["one", "two"]


def test_sse_accepts_crlf_lf_and_cr_line_ends() -> None:
    assert decode(b"data: a\r\n\r\ndata: b\n\ndata: c\r\rdata: d\r\n\r\n") == ["a", "b", "c", "d"]


def test_sse_a_line_longer_than_the_limit_is_a_stream_error_in_any_chunks() -> None:
    """A line sent a kilobyte at a time is held, not scanned again with every chunk (that was
    quadratic: 0.6 s of a blocked loop for a megabyte), and past MAX_LINE_BYTES it is refused."""
    decoder = SseDecoder()
    with pytest.raises(StreamError, match="line longer than"):
        for _ in range(MAX_LINE_BYTES // 1024 + 1):
            decoder.feed(b"x" * 1024)
    held = SseDecoder()
    assert [held.feed(piece) for piece in (b"data: ", b"ab", b"c", b"\n\n")][-1] == ["abc"]


def test_sse_crlf_split_across_chunks_is_one_line_end() -> None:
    assert decode(b"data: a\r", b"\n\r", b"\ndata: b\n\n") == ["a", "b"]


def test_sse_multi_line_data_joins_with_newlines() -> None:
    assert decode(b"data: one\ndata:two\n\n") == ["one\ntwo"]


def test_sse_comments_and_other_fields_are_skipped() -> None:
    assert decode(b": keep-alive\n\nevent: message\nid: 7\ndata: x\n\n") == ["x"]


def test_sse_unicode_line_separators_stay_inside_data() -> None:
    data = '{"content": "a\u2028b\x85c"}'
    assert decode(f"data: {data}\n\n".encode()) == [data]


def test_sse_unterminated_last_event_still_counts() -> None:
    assert decode(b"data: [DONE]") == ["[DONE]"]


def test_sse_invalid_utf8_is_a_stream_error() -> None:
    with pytest.raises(StreamError, match="not UTF-8"):
        decode(b"data: \xff\n\n")


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_sse_events_do_not_depend_on_chunk_boundaries(cuts: list[int]) -> None:
    stream = (
        b'data: {"a": 1}\r\n\r\n: ping\n\ndata: x\ndata: y\r\rdata: \xc3\xa9\n\ndata: [DONE]\n\n'
    )
    points = sorted({min(cut, len(stream)) for cut in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert decode(*pieces) == ['{"a": 1}', "x\ny", "é", "[DONE]"]


SSE_LINE = st.sampled_from(
    [b"", b": ping", b"event: x", b"data", b"data:x", b"data: y", b"data:  z"]
)


@given(st.lists(SSE_LINE | st.text(max_size=4).map(lambda t: b"data: " + t.encode()), max_size=12))
def test_sse_events_are_the_same_with_lf_and_crlf_line_ends(lines: list[bytes]) -> None:
    lf = b"".join(line + b"\n" for line in lines)
    assert decode(lf) == decode(lf.replace(b"\n", b"\r\n"))  # the LF-only path, the other


def test_chunk_content_and_finish_reason() -> None:
    chunk = parse_chunk(
        '{"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": null}]}'
    )
    assert (chunk.content, chunk.finish_reason, chunk.usage) == ("Hi", None, None)


def test_chunk_with_only_a_role_has_no_content() -> None:
    chunk = parse_chunk('{"choices": [{"delta": {"role": "assistant"}, "finish_reason": null}]}')
    assert chunk.content == ""


def test_usage_chunk_with_empty_choices() -> None:
    chunk = parse_chunk(
        '{"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12,'
        ' "prompt_tokens_details": {"cached_tokens": 0}}}'
    )
    assert chunk.usage == Usage(prompt_tokens=9, completion_tokens=3, total_tokens=12)
    assert chunk.content == ""


def test_usage_counts_below_zero_or_past_2_to_the_53_are_left_out() -> None:
    chunk = parse_chunk(
        '{"choices": [], "usage": {"prompt_tokens": 18446744073709551615,'
        ' "completion_tokens": -5, "total_tokens": 12}}'
    )
    assert chunk.usage == Usage(prompt_tokens=None, completion_tokens=None, total_tokens=12)


def test_chunk_that_is_not_json_is_a_stream_error() -> None:
    with pytest.raises(StreamError, match="malformed"):
        parse_chunk('{"choices": [')


def test_error_event_is_a_stream_error_with_its_message() -> None:
    with pytest.raises(StreamError, match="model overloaded"):
        parse_chunk('{"error": {"message": "model overloaded"}}')


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
CHOICE = st.fixed_dictionaries(
    {},
    optional={
        "delta": JSON | st.fixed_dictionaries({}, optional={"content": JSON}),
        "finish_reason": JSON,
    },
)


@given(
    st.fixed_dictionaries(
        {}, optional={"choices": JSON | st.lists(CHOICE | JSON, max_size=2), "usage": JSON}
    )
)
def test_any_json_chunk_is_a_chunk_or_a_stream_error(event: dict[str, Any]) -> None:
    try:
        chunk = parse_chunk(orjson.dumps(event).decode())
    except StreamError as exc:
        assert str(exc).startswith("sent a malformed event stream")
    else:
        assert isinstance(chunk.content, str)
        assert chunk.finish_reason is None or isinstance(chunk.finish_reason, str)


def event(content: str | None = None, finish: str | None = None) -> str:
    delta = {} if content is None else {"content": content}
    return orjson.dumps({"choices": [{"delta": delta, "finish_reason": finish}]}).decode()


def test_events_of_one_read_are_one_piece() -> None:
    completion = Completion()
    assert completion.take([event("Hel"), event(), event("lo")]) == ("Hello", None)
    assert not completion.done


def test_done_ends_the_completion_and_what_follows_is_ignored() -> None:
    completion = Completion()
    assert completion.take([event("Hi"), "[DONE]", event("late")]) == ("Hi", None)
    assert completion.done


def test_a_malformed_event_comes_after_the_content_before_it() -> None:
    text, failure = Completion().take([event("Hi"), '{"choices": ['])
    assert text == "Hi"
    assert isinstance(failure, StreamError)
    assert "malformed" in str(failure)


def test_a_body_that_ends_without_a_finish_reason_is_cut_short() -> None:
    completion = Completion()
    completion.take([event("Hi")])
    with pytest.raises(StreamError, match="before the reply finished"):
        completion.end()


def test_a_body_that_ends_after_a_finish_reason_is_complete() -> None:
    completion = Completion()
    completion.take([event("Hi", "stop")])
    completion.end()
    assert completion.done and completion.finished


def test_endpoint_is_shown_without_credentials() -> None:
    assert display_url("https://me:pw@llm.example:8443/v1/?k=1") == "https://llm.example:8443/v1"


def test_connect_timeout_is_named_as_one_not_as_a_late_first_token() -> None:
    # aiohttp's ConnectionTimeoutError is a TimeoutError as well
    message = failure_message(aiohttp.ConnectionTimeoutError(), "the LLM endpoint X", str)
    assert message == "timed out connecting to the LLM endpoint X"


def test_a_passed_deadline_is_described_by_the_clock() -> None:
    message = failure_message(TimeoutError(), "the LLM endpoint X", lambda: "stalled")
    assert message == "the LLM endpoint X stalled"


def test_proxy_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")  # lowercase wins
    monkeypatch.setenv("no_proxy", "")
    assert env_proxy("https://api.example/v1/chat/completions") == "http://proxy.example:3128"


def test_no_proxy_exempts_the_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    monkeypatch.setenv("no_proxy", "api.example")
    assert env_proxy("https://api.example/v1/chat/completions") is None


# ---------------------------------------------------------------- end to end


@pytest.fixture
async def fake() -> AsyncIterator[FakeLLM]:
    async with FakeLLM() as fake:
        yield fake


@pytest.fixture
async def app(make_app: AppFactory, fake: FakeLLM) -> App:
    """The server under test streams from the fake (overrides conftest's `app`)."""
    return await make_app(llm_base_url=fake.url, **FAST)


@pytest.fixture
async def client(connect: ClientFactory) -> Client:
    client = await connect()
    await with_avatar(client, "friendly")
    return client


async def final(client: Client, ref: str) -> dict[str, Any]:
    while True:
        frame = await client.recv()
        if frame.get("ref") == ref and frame["type"] != "reply_delta":
            return frame


async def history(client: Client) -> list[tuple[str, str]]:
    page = await client.request({"type": "history"})
    return [(m["role"], m["text"]) for m in page["messages"]]


async def upstream_closed(request: Received, timeout: float = 2.0) -> float:
    """When the fake saw the server close the connection that carried `request`."""
    await asyncio.wait_for(request.connection.closed.wait(), timeout)
    assert request.connection.closed_at is not None
    return request.connection.closed_at


async def test_reply_streams_deltas_then_the_whole_text(client: Client, fake: FakeLLM) -> None:
    fake.script = Script(token_delay_s=0.03)
    deltas, reply = await chat(client, "hi")
    assert reply["type"] == "reply"
    assert (reply["status"], reply["text"], reply["persona"]) == ("completed", WHOLE, "friendly")
    streamed = "".join(d["delta"] for d in deltas)
    assert len(deltas) >= 2
    assert WHOLE.startswith(streamed)  # what was still buffered at the end is only in the reply
    assert {d["reply_id"] for d in deltas} == {reply["reply_id"]}


async def test_fast_tokens_are_coalesced_into_fewer_deltas(client: Client, fake: FakeLLM) -> None:
    fake.script = Script(tokens=("ab ",) * 60)
    deltas, reply = await chat(client, "hi")
    assert reply["text"] == "ab " * 60
    assert 1 <= len(deltas) < 60


async def test_a_nul_from_the_model_is_stored_as_a_replacement_character(
    client: Client, connect: ClientFactory, fake: FakeLLM
) -> None:
    """PostgreSQL text cannot hold a NUL: one in a reply failed its whole group commit, the
    other users' chats in it with it."""
    fake.script = Script(tokens=("bad\x00", " byte"), token_delay_s=0.05)
    other = await connect()
    await with_avatar(other)
    (_, reply), (_, others) = await asyncio.gather(chat(client, "hi"), chat(other, "hello"))
    assert (reply["type"], reply["status"], reply["text"]) == (
        "reply",
        "completed",
        "bad\ufffd byte",
    )
    assert others["type"] == "reply", others
    history = await client.request({"type": "history"})
    assert history["messages"][-1]["text"] == "bad\ufffd byte"


async def test_completed_streams_reuse_one_upstream_connection(
    client: Client, fake: FakeLLM
) -> None:
    await chat(client, "hi")
    await chat(client, "again")
    assert len(fake.requests) == 2
    assert len(fake.connections) == 1


async def test_usage_from_the_chunk_with_empty_choices_is_in_the_reply(client: Client) -> None:
    _, reply = await chat(client, "hi")
    usage = reply["usage"]
    assert usage["completion_tokens"] == 4
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + 4


async def test_request_asks_for_a_stream_with_usage_and_the_settings(
    client: Client, fake: FakeLLM, app: App
) -> None:
    await chat(client, "hi")
    body = fake.requests[0].body
    settings = app.settings
    assert body["model"] == settings.llm_model
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == settings.llm_max_tokens
    assert body["temperature"] == settings.llm_temperature


async def test_no_authorization_header_without_a_key(client: Client, fake: FakeLLM) -> None:
    await chat(client, "hi")
    assert "authorization" not in fake.requests[0].headers


async def test_api_key_is_sent_as_a_bearer_token(
    make_app: AppFactory, connect: ClientFactory, fake: FakeLLM
) -> None:
    keyed = await make_app(llm_base_url=fake.url, llm_api_key=KEY, **FAST)
    client = await connect(target=keyed)
    await with_avatar(client)
    await chat(client, "hi")
    assert fake.requests[0].headers["authorization"] == f"Bearer {KEY}"


async def test_a_user_and_password_in_the_url_are_sent_as_basic_auth(
    make_app: AppFactory, connect: ClientFactory, fake: FakeLLM
) -> None:
    with_user = fake.url.replace("http://", "http://ann:s3cret@")
    app = await make_app(llm_base_url=with_user, **FAST)
    client = await connect(target=app)
    await with_avatar(client)
    _, reply = await chat(client, "hi")
    assert reply["type"] == "reply", reply
    assert fake.requests[0].headers["authorization"] == "Basic YW5uOnMzY3JldA=="  # ann:s3cret


def test_a_user_and_password_in_the_url_and_an_api_key_are_a_config_mistake() -> None:
    settings = settings_for_tests(llm_base_url="http://ann:pw@127.0.0.1:9/v1", llm_api_key=KEY)
    with pytest.raises(ConfigError, match="give the endpoint one of the two") as raised:
        OpenAIGenerator(settings)
    assert KEY not in str(raised.value) and "pw" not in str(raised.value)


async def test_error_names_the_endpoint_but_never_the_key(
    make_app: AppFactory, connect: ClientFactory, fake: FakeLLM
) -> None:
    fake.script = Script(status=401, error_message=f"Incorrect API key provided: {KEY}")
    keyed = await make_app(llm_base_url=fake.url, llm_api_key=KEY, **FAST)
    client = await connect(target=keyed)
    await with_avatar(client)
    _, error = await chat(client, "hi")
    assert (error["type"], error["code"], error["status"]) == ("error", "unavailable", 503)
    assert fake.url in error["message"]
    assert "401" in error["message"]
    assert KEY not in error["message"]


async def test_logs_never_contain_the_key(
    make_app: AppFactory,
    connect: ClientFactory,
    fake: FakeLLM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake.script = Script(status=400, error_message=f"stream_options unknown for key {KEY}")
    caplog.set_level(logging.DEBUG)
    keyed = await make_app(llm_base_url=fake.url, llm_api_key=KEY, **FAST)
    client = await connect(target=keyed)
    await with_avatar(client)
    await chat(client, "hi")
    assert "stream_options" in caplog.text
    assert KEY not in caplog.text


async def test_400_on_stream_options_is_retried_once_without_them(
    client: Client, fake: FakeLLM
) -> None:
    fake.script = Script(reject_stream_options=True)
    _, reply = await chat(client, "hi")
    assert (reply["status"], reply["text"]) == ("completed", WHOLE)
    assert "usage" not in reply
    assert [r.status for r in fake.requests] == [400, 200]
    assert ["stream_options" in r.body for r in fake.requests] == [True, False]


async def test_the_retry_after_a_400_that_closed_its_connection_goes_on_a_new_one(
    client: Client, fake: FakeLLM
) -> None:
    """The endpoint closes the connection after its 400 without saying so: the retry must not
    fail on the dead connection the pool still holds."""
    fake.script = Script(reject_stream_options=True, close_after_refusal=True)
    _, reply = await chat(client, "hi")
    assert (reply["type"], reply.get("status"), reply.get("text")) == ("reply", "completed", WHOLE)
    assert [r.status for r in fake.requests] == [400, 200]


async def test_endpoint_that_refused_stream_options_is_not_asked_again(
    client: Client, fake: FakeLLM
) -> None:
    fake.script = Script(reject_stream_options=True)
    await chat(client, "hi")
    _, reply = await chat(client, "again")
    assert reply["status"] == "completed"
    assert len(fake.requests) == 3
    assert "stream_options" not in fake.requests[2].body


async def test_slow_tokens_within_the_idle_timeout_complete(client: Client, fake: FakeLLM) -> None:
    fake.script = Script(token_delay_s=0.1)
    deltas, reply = await chat(client, "hi")
    assert (reply["status"], reply["text"]) == ("completed", WHOLE)
    assert len(deltas) >= 2


async def test_no_first_token_in_time_answers_unavailable(client: Client, fake: FakeLLM) -> None:
    fake.script = Script(first_token_delay_s=5.0)
    started = time.perf_counter()
    _, error = await chat(client, "hi")
    assert (error["code"], error["status"]) == ("unavailable", 503)
    assert error["message"] == f"the LLM endpoint {fake.url} sent no first token within 0.5 s"
    assert 0.5 <= time.perf_counter() - started < 2.0


async def test_stall_mid_stream_answers_unavailable_after_the_idle_timeout(
    client: Client, fake: FakeLLM
) -> None:
    fake.script = Script(stall_after=2)
    _, error = await chat(client, "hi")
    assert (error["code"], error["status"]) == ("unavailable", 503)
    assert error["message"] == f"the LLM endpoint {fake.url} stalled: nothing received for 0.3 s"


async def test_timed_out_stream_is_closed_upstream(client: Client, fake: FakeLLM) -> None:
    fake.script = Script(stall_after=2)
    await chat(client, "hi")
    await upstream_closed(fake.requests[0])
    assert fake.requests[0].connection.closed.is_set()


async def test_failed_reply_is_stored_with_its_partial_text(client: Client, fake: FakeLLM) -> None:
    fake.script = Script(stall_after=2)
    await chat(client, "hi")
    assert (await history(client))[-2:] == [("user", "hi"), ("assistant", "Hello there")]


async def test_a_reply_past_the_size_limit_is_cut_there_and_fails(
    make_app: AppFactory, connect: ClientFactory, fake: FakeLLM
) -> None:
    """An endpoint that does not stop (it ignores max_tokens): the reply was 733 million
    characters in 6 s and 2.6 GB of memory in an attack."""
    fake.script = Script(tokens=("x" * 1000,) * 10, stall_after=10)  # and it does not end
    app = await make_app(llm_base_url=fake.url, llm_max_reply_chars=4500, **FAST)
    client = await connect(target=app)
    await with_avatar(client)
    deltas, error = await chat(client, "hi")
    assert (error["code"], error["status"]) == ("unavailable", 503)
    assert "passed 4500 characters" in error["message"]
    assert sum(len(delta["delta"]) for delta in deltas) == 4500
    assert (await history(client))[-1] == ("assistant", "x" * 4500)
    await upstream_closed(fake.requests[0])


async def test_a_cancel_after_the_whole_reply_came_leaves_it_completed(
    client: Client, fake: FakeLLM
) -> None:
    """After `[DONE]` the body's end is read apart: a cancel then finds a reply already whole
    (it made it `cancelled` while the end was awaited)."""
    fake.script = Script(hold_after_done_s=1.0)
    ref = await first_delta(client, "hi")
    await client.send({"type": "cancel", "id": "stop"})
    final_reply = await final(client, ref)
    assert (final_reply["status"], final_reply["text"]) == ("completed", "Hello there, friend!")


async def test_mid_stream_disconnect_answers_unavailable(client: Client, fake: FakeLLM) -> None:
    fake.script = Script(disconnect_after=2)
    _, error = await chat(client, "hi")
    assert (error["code"], error["status"]) == ("unavailable", 503)
    assert error["message"].startswith(
        f"the LLM endpoint {fake.url} closed the stream before the reply finished"
    )


async def test_malformed_event_answers_unavailable(client: Client, fake: FakeLLM) -> None:
    fake.script = Script(malformed_after=1)
    _, error = await chat(client, "hi")
    assert (error["code"], error["status"]) == ("unavailable", 503)
    assert error["message"].startswith(f"the LLM endpoint {fake.url} sent a malformed event stream")


async def test_server_error_answers_unavailable_with_the_status(
    client: Client, fake: FakeLLM
) -> None:
    fake.script = Script(status=500, error_message="CUDA out of memory")
    _, error = await chat(client, "hi")
    assert (error["code"], error["status"]) == ("unavailable", 503)
    assert error["message"] == (
        f"the LLM endpoint {fake.url} answered 500 Internal Server Error: CUDA out of memory"
    )


async def test_refused_connection_answers_unavailable(
    make_app: AppFactory, connect: ClientFactory, refused_url: str
) -> None:
    down = await make_app(llm_base_url=refused_url, **FAST)
    client = await connect(target=down)
    await with_avatar(client)
    _, error = await chat(client, "hi")
    assert (error["code"], error["status"]) == ("unavailable", 503)
    assert (
        error["message"] == f"cannot connect to the LLM endpoint {refused_url}: connection refused"
    )


@pytest.fixture
def unanswered_url() -> Iterator[str]:
    """An endpoint that never completes a TCP handshake: a listener that accepts nothing, its
    backlog filled, so the kernel drops further connection attempts."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = [socket.socket() for _ in range(3)]
    for filler in fillers:
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
    yield f"http://127.0.0.1:{port}/v1"
    for sock in (*fillers, listener):
        sock.close()


async def test_connect_timeout_answers_unavailable(
    make_app: AppFactory, connect: ClientFactory, unanswered_url: str
) -> None:
    down = await make_app(llm_base_url=unanswered_url, **{**FAST, "llm_connect_timeout_s": 0.2})
    client = await connect(target=down)
    await with_avatar(client)
    _, error = await chat(client, "hi")
    assert (error["code"], error["status"]) == ("unavailable", 503)
    assert error["message"] == f"timed out connecting to the LLM endpoint {unanswered_url}"


async def test_connection_stays_usable_after_a_refused_connection(
    make_app: AppFactory, connect: ClientFactory, refused_url: str
) -> None:
    down = await make_app(llm_base_url=refused_url, **FAST)
    client = await connect(target=down)
    await with_avatar(client)
    await chat(client, "hi")
    assert (await client.request({"type": "ping"}))["type"] == "pong"
    _, again = await chat(client, "still there?")
    assert (again["type"], again["code"]) == ("error", "unavailable")
    assert [role for role, _ in await history(client)] == ["user", "assistant"] * 2


FAILURES = {  # the scripts that answer the failing chat's requests, in order
    "first-token-timeout": (Script(first_token_delay_s=5.0),),
    "idle-timeout": (Script(stall_after=1),),
    "disconnect": (Script(disconnect_after=1),),
    "malformed": (Script(malformed_after=1),),
    "status-500": (Script(status=500),),
    "status-400-twice": (Script(status=400), Script(status=400)),
}


@pytest.mark.parametrize("failure", FAILURES.values(), ids=FAILURES.keys())
async def test_connection_stays_usable_after_a_failure(
    client: Client, fake: FakeLLM, failure: tuple[Script, ...]
) -> None:
    fake.then(*failure)
    _, error = await chat(client, "hi")
    assert error["code"] == "unavailable"
    assert (await client.request({"type": "ping"}))["type"] == "pong"
    _, reply = await chat(client, "and now?")
    assert (reply["type"], reply["status"], reply["text"]) == ("reply", "completed", WHOLE)


async def test_cancel_closes_the_upstream_stream_within_100ms(
    client: Client, fake: FakeLLM
) -> None:
    fake.script = SLOW
    await first_delta(client, "tell me a long story")
    cancelled_at = time.perf_counter()
    await client.send({"type": "cancel"})
    closed_at = await upstream_closed(fake.requests[0])
    assert closed_at - cancelled_at < CANCEL_CLOSE_S


async def test_cancel_ends_the_reply_cancelled_with_the_partial_text(
    client: Client, fake: FakeLLM
) -> None:
    fake.script = SLOW
    ref = await first_delta(client, "tell me a long story")
    await client.send({"type": "cancel"})
    reply = await final(client, ref)
    assert (reply["type"], reply["status"], reply["persona"]) == ("reply", "cancelled", "friendly")
    assert reply["text"].startswith("tok ")
    assert reply["text"] == "tok " * (len(reply["text"]) // 4)
    assert len(reply["text"]) < len("tok ") * 100


async def test_cancelled_partial_text_is_stored(client: Client, fake: FakeLLM) -> None:
    fake.script = SLOW
    ref = await first_delta(client, "tell me a long story")
    await client.send({"type": "cancel"})
    reply = await final(client, ref)
    assert await history(client) == [
        ("user", "tell me a long story"),
        ("assistant", reply["text"]),
    ]


async def test_connection_stays_usable_after_cancel(client: Client, fake: FakeLLM) -> None:
    fake.then(SLOW)
    ref = await first_delta(client, "tell me a long story")
    await client.send({"type": "cancel"})
    await final(client, ref)
    _, reply = await chat(client, "short one")
    assert (reply["status"], reply["text"]) == ("completed", WHOLE)


async def test_closing_the_websocket_closes_the_upstream_stream(
    client: Client, fake: FakeLLM
) -> None:
    fake.script = SLOW
    await first_delta(client, "tell me a long story")
    gone_at = time.perf_counter()
    await client.conn.close()
    closed_at = await upstream_closed(fake.requests[0])
    assert closed_at - gone_at < CANCEL_CLOSE_S


SWITCHES = {
    "set_persona": {"type": "set_persona", "personality": "witty"},
    "slash-persona": {"type": "chat", "text": "/persona witty"},
}


@pytest.mark.parametrize("switch", SWITCHES.values(), ids=SWITCHES.keys())
async def test_persona_switch_during_a_stream_is_answered_before_the_reply(
    client: Client, fake: FakeLLM, switch: dict[str, str]
) -> None:
    fake.script = Script(tokens=("tok ",) * 10, token_delay_s=0.03)
    ref = await first_delta(client, "hi")
    await client.send({"id": "switch", **switch})
    frames: list[dict[str, Any]] = []
    while not frames or frames[-1].get("ref") != ref or frames[-1]["type"] == "reply_delta":
        frames.append(await client.recv())
    answers = [(f["type"], f["ref"]) for f in frames if f["type"] != "reply_delta"]
    assert answers == [("persona_set", "switch"), ("reply", ref)]


async def test_reply_streaming_during_a_switch_keeps_its_persona(
    client: Client, fake: FakeLLM
) -> None:
    fake.script = Script(tokens=("tok ",) * 10, token_delay_s=0.03)
    ref = await first_delta(client, "hi")
    await client.send({"type": "set_persona", "personality": "witty"})
    reply = await final(client, ref)
    assert (reply["status"], reply["persona"]) == ("completed", "friendly")
    assert reply["text"] == "tok " * 10
    assert fake.requests[0].system_prompt == persona_system_prompt(get_card("friendly"), "Ava")


async def test_chat_after_a_switch_during_a_stream_uses_the_new_persona(
    client: Client, fake: FakeLLM
) -> None:
    fake.then(Script(tokens=("tok ",) * 10, token_delay_s=0.03))
    await first_delta(client, "hi")
    await client.send({"type": "set_persona", "personality": "witty"})
    _, reply = await chat(client, "who are you now?")
    assert (reply["status"], reply["persona"]) == ("completed", "witty")
    assert fake.requests[1].system_prompt == persona_system_prompt(get_card("witty"), "Ava")


async def test_system_prompt_belongs_to_the_new_persona_right_after_a_switch(
    client: Client, fake: FakeLLM
) -> None:
    witty = get_card("witty")
    await client.send({"type": "set_persona", "personality": "witty"})
    _, reply = await chat(client, "hi")
    assert reply["persona"] == "witty"
    messages = fake.requests[0].messages
    assert messages[0] == {"role": "system", "content": persona_system_prompt(witty, "Ava")}
    assert messages[-1] == {"role": "system", "content": witty.post_history_instruction}


async def test_recent_history_from_the_database_is_sent(client: Client, fake: FakeLLM) -> None:
    await chat(client, "I adopted a cat")
    await chat(client, "She is called Miso")
    assert fake.requests[1].messages[1:-1] == [
        {"role": "user", "content": "I adopted a cat"},
        {"role": "assistant", "content": WHOLE},
        {"role": "user", "content": "She is called Miso"},
    ]


async def test_a_stream_behind_a_switch_without_avatar_is_never_generated(
    connect: ClientFactory, fake: FakeLLM
) -> None:
    client = await connect()  # no avatar
    await client.send({"type": "set_persona", "id": "s1", "personality": "witty"})
    await client.send({"type": "chat", "id": "m1", "text": "hello?"})
    first, second = await client.recv(), await client.recv()
    assert [(f["type"], f["ref"], f.get("code")) for f in (first, second)] == [
        ("error", "s1", "no_avatar"), ("error", "m1", "no_avatar"),
    ]  # fmt: skip
    assert fake.requests == []


async def test_a_stream_behind_a_switch_starts_after_its_acknowledgement(
    client: Client, fake: FakeLLM
) -> None:
    fake.script = Script(tokens=("tok ",) * 3)
    await client.send({"type": "set_persona", "id": "s1", "personality": "witty"})
    await client.send({"type": "chat", "id": "m1", "text": "hello?"})
    frames = [await client.recv()]
    while frames[-1]["type"] != "reply":
        frames.append(await client.recv())
    assert (frames[0]["type"], frames[0]["ref"]) == ("persona_set", "s1")
    assert (frames[-1]["persona"], frames[-1]["status"]) == ("witty", "completed")


async def test_prompt_after_a_switch_marks_it_and_cuts_the_old_voice(
    make_app: AppFactory, connect: ClientFactory, fake: FakeLLM
) -> None:
    app = await make_app(llm_base_url=fake.url, history_other_persona_chars=10, **FAST)
    client = await connect(target=app)
    await with_avatar(client, "friendly")
    await chat(client, "I adopted a cat")
    await client.request({"type": "set_persona", "personality": "witty"})
    await chat(client, "She is called Miso")
    assert fake.requests[1].messages[1:-1] == [
        {"role": "user", "content": "I adopted a cat"},
        {"role": "assistant", "content": "Hello…"},  # "Hello there, friend!" cut to 10
        {
            "role": "system",
            "content": switch_note("friendly", get_card("witty"), examples=True, others=OTHERS),
        },
        {"role": "user", "content": "She is called Miso"},
    ]


async def test_notes_as_user_fold_the_switch_marker_into_the_next_user_message(
    make_app: AppFactory, connect: ClientFactory, fake: FakeLLM
) -> None:
    app = await make_app(llm_base_url=fake.url, llm_notes_as="user", **FAST)
    client = await connect(target=app)
    await with_avatar(client, "friendly")
    await chat(client, "I adopted a cat")
    await client.request({"type": "set_persona", "personality": "witty"})
    await chat(client, "She is called Miso")
    messages = fake.requests[1].messages
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    note = switch_note("friendly", get_card("witty"), examples=True, others=OTHERS)
    assert note in messages[-1]["content"] and "She is called Miso" in messages[-1]["content"]


async def test_switch_through_another_connection_is_marked_from_the_stored_history(
    connect: ClientFactory, fake: FakeLLM, user: str
) -> None:
    mine = await connect(user)
    await with_avatar(mine, "friendly")
    await chat(mine, "I adopted a cat")
    other = await connect(user)
    await other.request({"type": "set_persona", "personality": "caring"})
    await mine.recv_type("persona_changed")
    await chat(mine, "She is called Miso")
    await chat(mine, "She sleeps a lot")
    marked, after = fake.requests[1].messages, fake.requests[2].messages
    assert marked[3] == {
        "role": "system",
        "content": switch_note("friendly", get_card("caring"), examples=True, others=OTHERS),
    }
    assert after[1:-1] == [  # the switch stays marked where it happened, without examples
        {"role": "user", "content": "I adopted a cat"},
        {"role": "assistant", "content": WHOLE},  # short: nothing to cut
        {"role": "system", "content": switch_note("friendly", get_card("caring"), others=OTHERS)},
        {"role": "user", "content": "She is called Miso"},
        {"role": "assistant", "content": WHOLE},
        {"role": "user", "content": "She sleeps a lot"},
    ]
