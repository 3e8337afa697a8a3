"""A fake OpenAI-compatible endpoint: a real HTTP/1.1 server on 127.0.0.1 that streams SSE."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson

COMPLETIONS_PATH = "/v1/chat/completions"
MODEL = "fake-model"
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
)
REASONS = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 500: "Internal Server Error"}


@dataclass(frozen=True, slots=True)
class Script:
    """How the fake answers one request. Counts (`stall_after` …) are content tokens sent first."""

    tokens: tuple[str, ...] = ("Hello", " there", ", friend", "!")
    first_token_delay_s: float = 0.0  # after the headers and the role chunk
    token_delay_s: float = 0.0  # between content tokens
    status: int = 200  # anything else: that status with an OpenAI-style error body
    error_message: str = "the fake endpoint refuses"
    reject_stream_options: bool = False  # 400 to a request that carries `stream_options`
    close_after_refusal: bool = False  # and close the connection after it, unannounced
    stall_after: int | None = None  # then send nothing more, keeping the connection open
    disconnect_after: int | None = None  # then close the socket in the middle of the body
    malformed_after: int | None = None  # then send an event whose data is not JSON
    finish_reason: str = "stop"
    hold_after_done_s: float = 0.0  # between `[DONE]` and the body's end, the connection open


@dataclass(slots=True)
class Connection:
    """One TCP connection from the client, and when the fake saw the client close it."""

    opened_at: float
    closed_at: float | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def mark_closed(self) -> None:
        if self.closed_at is None:
            self.closed_at = time.perf_counter()
            self.closed.set()


@dataclass(slots=True)
class Received:
    """One request as the fake read it off the socket (times are `time.perf_counter()`)."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    connection: Connection
    arrived_at: float
    first_token_at: float | None = None
    status: int | None = None

    @property
    def messages(self) -> list[dict[str, str]]:
        messages: list[dict[str, str]] = self.body.get("messages", [])
        return messages

    @property
    def system_prompt(self) -> str:
        return self.messages[0]["content"]


class _Reader:
    """Buffered reads of one connection: requests, and the end of the stream."""

    def __init__(self, reader: asyncio.StreamReader, connection: Connection) -> None:
        self._reader = reader
        self._connection = connection
        self._data = b""

    async def _more(self) -> bool:
        chunk = await self._reader.read(65536)
        if not chunk:
            self._connection.mark_closed()
            return False
        self._data += chunk
        return True

    async def request(self) -> Received | None:
        """The next request, or None when the client closed the connection."""
        while b"\r\n\r\n" not in self._data:
            if not await self._more():
                return None
        head, _, self._data = self._data.partition(b"\r\n\r\n")
        request_line, *lines = head.decode("latin-1").split("\r\n")
        method, path, _ = request_line.split(" ", 2)
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self._data) < length:
            if not await self._more():
                return None
        body, self._data = self._data[:length], self._data[length:]
        return Received(
            method=method,
            path=path,
            headers=headers,
            body=orjson.loads(body) if body else {},
            connection=self._connection,
            arrived_at=time.perf_counter(),
        )

    async def wait_closed(self) -> None:
        """Return when the client closes the connection; what it sends meanwhile is kept."""
        while await self._more():
            pass


class FakeLLM:
    """Scriptable per test: `script` answers every request, unless `then()` queued others."""

    def __init__(self, script: Script | None = None) -> None:
        self.script = script or Script()
        self.queued: deque[Script] = deque()
        self.requests: list[Received] = []
        self.connections: list[Connection] = []
        self.request_arrived = asyncio.Event()
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> FakeLLM:
        return await self.start()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> FakeLLM:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for writer in tuple(self._writers):
            writer.close()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5.0)
        await server.wait_closed()

    @property
    def url(self) -> str:
        """The base URL a client is configured with (it appends `/chat/completions`)."""
        assert self._server is not None, "start() first"
        port: int = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    def then(self, *scripts: Script) -> None:
        """Answer the next requests with these scripts, in order, then with `script` again."""
        self.queued.extend(scripts)

    async def next_request(self, timeout: float = 5.0) -> Received:
        """Wait for one more request than there are now."""
        count = len(self.requests)
        async with asyncio.timeout(timeout):
            while len(self.requests) <= count:
                self.request_arrived.clear()
                await self.request_arrived.wait()
        return self.requests[count]

    # ------------------------------------------------------------------ serving

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = Connection(opened_at=time.perf_counter())
        self.connections.append(connection)
        self._writers.add(writer)
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
            handler.add_done_callback(self._handlers.discard)
        buffered = _Reader(reader, connection)
        try:
            while (request := await buffered.request()) is not None:
                self.requests.append(request)
                self.request_arrived.set()
                script = self.queued.popleft() if self.queued else self.script
                if not await self._answer(request, script, buffered, writer):
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(
        self, request: Received, script: Script, reader: _Reader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; False when the connection must not be used again."""
        if request.method != "POST" or request.path != COMPLETIONS_PATH:
            return await _refuse(request, writer, 404, f"no route for {request.path}")
        if script.reject_stream_options and "stream_options" in request.body:
            kept = await _refuse(
                request, writer, 400, "Unrecognized request argument: stream_options"
            )
            return kept and not script.close_after_refusal
        if script.status != 200:
            return await _refuse(request, writer, script.status, script.error_message)
        request.status = 200
        streaming = asyncio.create_task(self._stream(request, script, writer))
        closing = asyncio.create_task(reader.wait_closed())
        await asyncio.wait({streaming, closing}, return_when=asyncio.FIRST_COMPLETED)
        for task in (streaming, closing):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await task
        if closing.done() and not closing.cancelled():
            return False
        return not streaming.cancelled() and streaming.exception() is None and streaming.result()

    async def _stream(
        self, request: Received, script: Script, writer: asyncio.StreamWriter
    ) -> bool:
        """Send the event stream; False when the script ends the connection mid-body."""
        stream = _EventStream(request, next(self._ids), writer)
        writer.write(SSE_HEAD)
        await stream.send_delta({"role": "assistant", "content": ""})
        await asyncio.sleep(script.first_token_delay_s)
        for index, token in enumerate(script.tokens):
            if index == script.stall_after:
                await asyncio.Event().wait()
            if index == script.disconnect_after:
                return False
            if index == script.malformed_after:
                await stream.send_raw(b'data: {"choices": [{"delta": \n\n')
            if index and script.token_delay_s:
                await asyncio.sleep(script.token_delay_s)
            await stream.send_delta({"content": token})
            if request.first_token_at is None:
                request.first_token_at = time.perf_counter()
        if script.stall_after is not None and script.stall_after >= len(script.tokens):
            await asyncio.Event().wait()
        await stream.finish(script, len(script.tokens))
        return True


class _EventStream:
    """The `chat.completion.chunk` events of one response, as HTTP chunks."""

    def __init__(self, request: Received, number: int, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._id = f"chatcmpl-fake{number}"
        self._created = int(time.time())
        self._usage = bool(request.body.get("stream_options", {}).get("include_usage"))
        self._prompt_tokens = sum(len(m.get("content", "").split()) for m in request.messages)

    def _event(self, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> bytes:
        event: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": MODEL,
            "system_fingerprint": "fp_fake",
            "choices": choices,
        }
        if self._usage:
            event["usage"] = usage
        return b"data: " + orjson.dumps(event) + b"\n\n"

    async def send_raw(self, data: bytes) -> None:
        self._writer.write(b"%x\r\n%b\r\n" % (len(data), data))
        await self._writer.drain()

    async def send_delta(self, delta: dict[str, str], finish: str | None = None) -> None:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        await self.send_raw(self._event([choice], None))

    async def finish(self, script: Script, completion_tokens: int) -> None:
        await self.send_delta({}, script.finish_reason)
        if self._usage:
            usage = {
                "prompt_tokens": self._prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": self._prompt_tokens + completion_tokens,
            }
            await self.send_raw(self._event([], usage))
        await self.send_raw(b"data: [DONE]\n\n")
        if script.hold_after_done_s:
            await asyncio.sleep(script.hold_after_done_s)
        self._writer.write(b"0\r\n\r\n")
        await self._writer.drain()


async def _refuse(
    request: Received, writer: asyncio.StreamWriter, status: int, message: str
) -> bool:
    request.status = status
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    body = orjson.dumps({"error": error})
    reason = REASONS.get(status, "Error")
    writer.write(
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    return True
