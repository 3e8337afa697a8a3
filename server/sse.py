"""A chat completions event stream, without I/O: server-sent events from bytes, and what each
`chat.completion.chunk` carries (content, finish reason, usage)."""

from __future__ import annotations

import re
from typing import NamedTuple

import orjson

from protocol.frames import Usage

DONE = "[DONE]"
DETAIL_CHARS = 200
MAX_LINE_BYTES = 1 << 20
MAX_TOKEN_COUNT = 2**53 - 1  # a usage count past this, or below 0, is left out (JavaScript numbers)
_EOL = re.compile(rb"\r\n|\r|\n")
_USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


class StreamError(Exception):
    """The endpoint answered, but not with a usable stream; the text completes "the endpoint …"."""


class SseDecoder:
    """Server-sent events from raw bytes: feed chunks, get the `data` of each complete event.

    Lines end with CRLF, LF or CR (split on bytes, so no Unicode line separator inside a JSON
    string can cut a line); `data` lines of one event join with LF; comments and other fields
    are skipped.
    """

    __slots__ = ("_after_cr", "_buffer", "_data", "_held", "_held_bytes")

    def __init__(self) -> None:
        self._buffer = b""
        self._held: list[bytes] = []  # chunks of an unfinished line after `_buffer`, unscanned
        self._held_bytes = 0
        self._data: list[str] = []
        self._after_cr = False

    def feed(self, chunk: bytes) -> list[str]:
        if not chunk:
            return []
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._after_cr = False
        if b"\n" not in chunk and b"\r" not in chunk:
            # no line ends: held as it is, so that a long line costs its length once, not
            # once per chunk
            if chunk:
                self._held.append(chunk)
                self._held_bytes += len(chunk)
                if len(self._buffer) + self._held_bytes > MAX_LINE_BYTES:
                    raise StreamError(
                        f"sent an event stream line longer than {MAX_LINE_BYTES} bytes"
                    )
            return []
        if self._held:
            buffer = b"".join((self._buffer, *self._held, chunk))
            self._held.clear()
            self._held_bytes = 0
        else:
            buffer = self._buffer + chunk if self._buffer else chunk
        events: list[str] = []
        if b"\r" in buffer:
            start = 0
            for match in _EOL.finditer(buffer):
                if match.group() == b"\r" and match.end() == len(buffer):
                    self._after_cr = True  # a CRLF may be split across two chunks
                self._line(buffer[start : match.start()], events)
                start = match.end()
            self._buffer = buffer[start:]
        else:  # the usual stream: LF only, split in C, `data: ` lines taken here
            lines = buffer.split(b"\n")
            self._buffer = lines.pop()
            data = self._data
            for line in lines:
                if not line:
                    if data:
                        events.append(data[0] if len(data) == 1 else "\n".join(data))
                        data = self._data = []
                elif line.startswith(b"data: "):
                    try:
                        data.append(line[6:].decode("utf-8"))
                    except UnicodeDecodeError:
                        raise StreamError("sent an event stream that is not UTF-8") from None
                else:
                    self._line(line, events)  # appends to `data` (the same list) if anything
        if len(self._buffer) > MAX_LINE_BYTES:
            raise StreamError(f"sent an event stream line longer than {MAX_LINE_BYTES} bytes")
        return events

    def close(self) -> list[str]:
        """End of stream: an unterminated last line or event still counts."""
        events: list[str] = []
        if self._held:
            self._buffer = b"".join((self._buffer, *self._held))
            self._held.clear()
            self._held_bytes = 0
        if self._buffer:
            self._line(self._buffer, events)
            self._buffer = b""
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[str]) -> None:
        if not line:
            if self._data:
                events.append("\n".join(self._data))
                self._data = []
            return
        if line.startswith(b"data: "):
            value = line[6:]
        elif line.partition(b":")[0] == b"data":
            value = line[5:]
        else:
            return  # a comment (empty field name), `event:`, `id:`, `retry:`
        try:
            self._data.append(value.decode("utf-8"))
        except UnicodeDecodeError:
            raise StreamError("sent an event stream that is not UTF-8") from None


class Chunk(NamedTuple):
    """What one `chat.completion.chunk` event carries for us (a named tuple: one is made per
    token, and a frozen dataclass costs several times as much to make)."""

    content: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None


def parse_chunk(data: str) -> Chunk:
    """One event's `data`: `choices[0].delta.content`, `finish_reason` and `usage`.

    `choices` may be empty (the usage chunk). An `error` object is raised as a `StreamError`.
    """
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise StreamError(f"sent a malformed event stream: {clip(data)!r}") from None
    if type(event) is not dict:  # orjson makes exact dicts, lists and strs
        raise StreamError(f"sent a malformed event stream: {clip(data)!r}")
    if "error" in event:
        raise StreamError(f"reported an error mid-stream: {error_detail(event)}")
    choices = event.get("choices") or []
    if type(choices) is not list:
        raise StreamError("sent a malformed event stream: `choices` is not a list")
    usage = event.get("usage")
    if usage is not None:
        usage = parse_usage(usage)
    if not choices:
        return Chunk("", None, usage)
    choice = choices[0]
    delta = choice.get("delta") if type(choice) is dict else None
    if type(choice) is not dict or (delta is not None and type(delta) is not dict):
        raise StreamError("sent a malformed event stream: a choice without a `delta` object")
    content = (delta.get("content") or "") if delta is not None else ""
    finish = choice.get("finish_reason")
    if type(content) is not str or (finish is not None and type(finish) is not str):
        raise StreamError("sent a malformed event stream: `content` is not a string")
    if "\x00" in content:  # PostgreSQL text cannot hold it; the model's text is not refused for it
        content = content.replace("\x00", "\ufffd")
    return Chunk(content, finish, usage)


def parse_usage(value: object) -> Usage | None:
    """The token counts of a `usage` object, when it has any."""
    if not isinstance(value, dict):
        return None
    counts = {
        name: count
        for name in _USAGE_FIELDS
        if type(count := value.get(name)) is int and 0 <= count <= MAX_TOKEN_COUNT
    }
    if not counts:
        return None
    return Usage(
        prompt_tokens=counts.get("prompt_tokens"),
        completion_tokens=counts.get("completion_tokens"),
        total_tokens=counts.get("total_tokens"),
    )


def error_detail(body: object) -> str:
    """The message of an OpenAI-style error body (`{"error": {"message": …}}`), clipped."""
    if isinstance(body, dict):
        error = body.get("error", body.get("detail", body.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        if error is not None:
            return clip(error if isinstance(error, str) else orjson.dumps(error).decode())
    return clip(body if isinstance(body, str) else orjson.dumps(body).decode())


def clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= DETAIL_CHARS else text[: DETAIL_CHARS - 1] + "…"


class Completion:
    """What a chat completion's events have said so far: the usage, whether a `finish_reason`
    came, whether `[DONE]` did."""

    __slots__ = ("done", "finished", "usage")

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.finished = False
        self.done = False

    def take(self, events: list[str]) -> tuple[str, StreamError | None]:
        """The content of `events` (those that came in one read) as one piece, up to `[DONE]`;
        and a malformed event's error, to be raised after the content that came before it."""
        pieces: list[str] = []
        for data in events:
            if data.strip() == DONE:
                self.done = True
                break
            try:
                chunk = parse_chunk(data)
            except StreamError as exc:
                return "".join(pieces), exc
            self.usage = chunk.usage or self.usage
            self.finished = self.finished or chunk.finish_reason is not None
            if chunk.content:
                pieces.append(chunk.content)
        return (pieces[0] if len(pieces) == 1 else "".join(pieces)), None

    def end(self) -> None:
        """The body ended without `[DONE]`: complete only if a choice had finished."""
        if not self.finished:
            raise StreamError("closed the stream before the reply finished")
        self.done = True
