"""The OpenAI-compatible reply generator: chat completions streamed over HTTP (SSE) with aiohttp."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit
from urllib.request import getproxies, proxy_bypass

import aiohttp
import orjson

from protocol.frames import Usage
from server.generators import GeneratorUnavailable, TurnContext
from server.render import ChatMessage, build_prompt, notes_in_user_turns
from server.settings import ConfigError, Settings
from server.sse import Completion, SseDecoder, StreamError, clip, error_detail

log = logging.getLogger(__name__)

DRAIN_S = 0.25
KEEPALIVE_S = 4.0  # under the 5 s after which uvicorn (vLLM) and others close an idle connection


def display_url(url: str) -> str:
    """The endpoint as it may be shown to users and logs: no credentials, query or fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


class _Clock:
    """The stream's deadlines: the first token by a fixed time, then at most `idle_s` per read.

    One timer per stream, not one per read (an `asyncio.timeout` per chunk was a tenth of the
    streaming path's CPU): a read notes when it began, and the timer, when it comes due, cancels
    the task if it finds a read that has waited past its deadline, else it is set again for the
    read it finds. The cancel is turned into `TimeoutError` in `read`, as `asyncio.timeout` does.
    """

    def __init__(self, first_token_s: float, idle_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None, "a stream is read in a task"
        self._task = task
        self._cancelling = task.cancelling()
        self._first_token_s = first_token_s
        self._idle_s = idle_s
        self.deadline = self._loop.time() + first_token_s
        self.streaming = False
        self._read_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False

    def started_streaming(self) -> None:
        """The first token came: from now on each read has `idle_s`."""
        self.streaming = True
        self.stop()

    async def read(self, read_any: Callable[[], Awaitable[bytes]]) -> bytes | None:
        """The next chunk of the body, or None at its end; TimeoutError past the deadline."""
        self._read_since = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(self._due(self._read_since), self._check)
        try:
            return await read_any() or None
        except asyncio.CancelledError:
            if self._expired and self._task.uncancel() <= self._cancelling:
                raise TimeoutError from None
            raise
        finally:
            self._read_since = None

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _due(self, read_since: float) -> float:
        return read_since + self._idle_s if self.streaming else self.deadline

    def _check(self) -> None:
        self._timer = None
        since = self._read_since
        if since is None:
            return  # no read waiting: the next one sets the timer again
        due = self._due(since)
        if self._loop.time() >= due:
            self._expired = True
            self._task.cancel()
        else:
            self._timer = self._loop.call_at(due, self._check)

    def describe_timeout(self) -> str:
        if self.streaming:
            return f"stalled: nothing received for {self._idle_s:g} s"
        return f"sent no first token within {self._first_token_s:g} s"


class OpenAIGenerator:
    """Streams replies from an OpenAI-compatible `/chat/completions` endpoint.

    Ollama, llama.cpp's `llama-server`, vLLM and OpenAI all speak it. One `aiohttp.ClientSession`
    (one connection pool, made on first use inside the event loop) serves every session of the
    process. aiohttp rather than httpx: its HTTP parser is in C and a body chunk reaches the
    stream's reader in one call, where httpx, httpcore, h11 and anyio took a quarter of the
    streaming path's CPU per token (issue #18).
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        parts = urlsplit(settings.llm_base_url)  # its scheme is checked by Settings
        self.endpoint = display_url(settings.llm_base_url)
        self._key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else ""
        headers = {
            "Accept": "text/event-stream",
            "Accept-Encoding": "identity",  # a compressed event stream would hold tokens back
            "Content-Type": "application/json",
        }
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        if parts.username is not None or parts.password is not None:
            # a user and password in the URL are sent as basic auth: with an API key as well,
            # it is not clear which of the two the endpoint wants
            if self._key:
                raise ConfigError(
                    "CHAT_LLM_BASE_URL holds a user and password and CHAT_LLM_API_KEY is set:"
                    " give the endpoint one of the two"
                )
            user, password = unquote(parts.username or ""), unquote(parts.password or "")
            headers["Authorization"] = aiohttp.encode_basic_auth(user, password)
        netloc = parts.netloc.rpartition("@")[2]
        base = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
        self._url = base.rstrip("/") + "/chat/completions"
        self._headers = headers
        self._proxy = env_proxy(self._url)
        self._session: aiohttp.ClientSession | None = None
        self._drains: set[asyncio.Task[None]] = set()  # bodies read to their end after [DONE]
        self._include_usage = True

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connect_s = self._settings.llm_connect_timeout_s
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S),
                headers=self._headers,
                # connect: the TCP connection and the TLS handshake (sock_connect: the former)
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=connect_s, sock_connect=connect_s
                ),
                auto_decompress=False,
            )
        return self._session

    @property
    def reads_history(self) -> bool:
        return True

    @property
    def streams(self) -> bool:
        return True

    def render(self, turn: TurnContext) -> None:
        return None  # a model's reply always streams

    async def aclose(self) -> None:
        if self._drains:
            await asyncio.gather(*self._drains, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def stream(self, turn: TurnContext) -> AsyncGenerator[str | Usage, None]:
        """The reply's pieces, then its `Usage` when the endpoint reports one.

        Closing this iterator (or cancelling the task that iterates it) closes the upstream
        HTTP stream at once. Every upstream failure raises `GeneratorUnavailable`.
        """
        settings = self._settings
        clock = _Clock(settings.llm_first_token_timeout_s, settings.llm_idle_timeout_s)
        response: aiohttp.ClientResponse | None = None
        try:
            response = await self._open(self._messages(turn), clock)
            # the body's events, read in this generator itself: a second generator in
            # between would be one more resumption per token. The pieces of the events that
            # came in one read go on as one (a server that fell behind catches up in fewer
            # frames).
            content, decoder, completion = response.content, SseDecoder(), Completion()
            while not completion.done:
                raw = await clock.read(content.readany)
                events = decoder.feed(raw) if raw is not None else decoder.close()
                text, failure = completion.take(events)
                if text:
                    if not clock.streaming:
                        clock.started_streaming()
                    yield text
                if failure is not None:
                    raise failure
                if completion.done:
                    # the reply is whole: what follows `[DONE]` is read apart, so that a cancel
                    # meanwhile does not turn a finished reply into a cancelled one
                    drain = asyncio.create_task(_drain_then_close(response))
                    self._drains.add(drain)
                    drain.add_done_callback(self._drains.discard)
                    response = None
                elif raw is None:
                    completion.end()
            if completion.usage is not None:
                yield completion.usage
        except (aiohttp.ClientError, TimeoutError, StreamError) as exc:
            raise self._unavailable(exc, clock) from exc
        finally:
            clock.stop()
            if response is not None:
                response.close()  # after the body's end the connection is back in the pool

    def _messages(self, turn: TurnContext) -> list[ChatMessage]:
        settings = self._settings
        messages = build_prompt(
            turn.card,
            turn.recent,
            turn.text,
            settings.history_other_persona_chars,
            turn.others,
            turn.avatar_name,
            turn.user_name,
        )
        if settings.llm_notes_as == "user":
            messages = notes_in_user_turns(messages)
        return messages

    async def _open(self, messages: list[ChatMessage], clock: _Clock) -> aiohttp.ClientResponse:
        """POST the request; retry once without `stream_options` if the endpoint refuses them."""
        include_usage = self._include_usage
        response = await self._post(messages, include_usage, clock)
        if response.status == 400 and include_usage:
            detail = await self._error_detail(response, clock)
            log.info(
                "LLM endpoint %s answered 400 to stream_options (%s); retrying without them",
                self.endpoint,
                detail,
            )
            response = await self._post(messages, False, clock)
            if response.status != 400:
                self._include_usage = False
        if not 200 <= response.status < 300:
            detail = await self._error_detail(response, clock)
            status = f"answered {response.status} {response.reason or ''}".rstrip()
            raise StreamError(f"{status}: {detail}" if detail else status)
        return response

    async def _post(
        self, messages: list[ChatMessage], include_usage: bool, clock: _Clock
    ) -> aiohttp.ClientResponse:
        settings = self._settings
        body: dict[str, Any] = {
            "model": settings.llm_model,
            "messages": messages,
            "stream": True,
            "max_tokens": settings.llm_max_tokens,
            "temperature": settings.llm_temperature,
        }
        if include_usage:
            body["stream_options"] = {"include_usage": True}
        post = functools.partial(
            self._client().post,
            self._url,
            data=orjson.dumps(body),
            allow_redirects=False,
            proxy=self._proxy,
        )
        async with asyncio.timeout_at(clock.deadline):
            try:
                return await post()
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if isinstance(exc, aiohttp.ClientConnectorError):
                    raise  # a new connection that failed: nothing to gain from another
                # a pooled connection the endpoint had closed (after a 400, or idle past its
                # keep-alive): nothing was answered on it, so the request goes on a new one
                log.debug(
                    "LLM endpoint %s: a pooled connection was closed (%s)", self.endpoint, exc
                )
                return await post()

    async def _error_detail(self, response: aiohttp.ClientResponse, clock: _Clock) -> str:
        """The error message in a refusal's body; the response is closed afterwards."""
        try:
            async with asyncio.timeout_at(clock.deadline):
                body = await response.read()
        finally:
            response.close()
        try:
            detail = error_detail(orjson.loads(body))
        except orjson.JSONDecodeError:
            detail = clip(body.decode("utf-8", "replace"))
        return self._redact(detail)

    def _unavailable(self, exc: Exception, clock: _Clock) -> GeneratorUnavailable:
        """One upstream failure as a message that names the endpoint, never the key."""
        message = failure_message(exc, f"the LLM endpoint {self.endpoint}", clock.describe_timeout)
        return GeneratorUnavailable(self._redact(message))

    def _redact(self, text: str) -> str:
        """`text` with the API key masked, should an endpoint echo it back."""
        return text.replace(self._key, "***") if self._key else text


def failure_message(exc: Exception, where: str, timeout: Callable[[], str]) -> str:
    """What went wrong upstream, in a sentence about `where`; `timeout` describes a deadline
    that passed (the first token's or a read's)."""
    match exc:
        case StreamError():
            return f"{where} {exc}"
        case aiohttp.ConnectionTimeoutError():  # a TimeoutError too: matched first
            return f"timed out connecting to {where}"
        case TimeoutError():
            return f"{where} {timeout()}"
        case aiohttp.ClientConnectorError():
            return f"cannot connect to {where}: {connect_failure(exc)}"
        case (
            aiohttp.ClientPayloadError()
            | aiohttp.ServerDisconnectedError()
            | aiohttp.ClientOSError()
        ):
            return f"{where} closed the stream before the reply finished ({exc})"
        case _:
            return f"lost the connection to {where}: {type(exc).__name__} {exc}"


def env_proxy(url: str) -> str | None:
    """The proxy the environment names for `url` (`HTTPS_PROXY`, `NO_PROXY` …), read once: httpx
    took it from there, and aiohttp's `trust_env` would read it, and `.netrc`, on every request."""
    parts = urlsplit(url)
    if parts.hostname is None or proxy_bypass(parts.hostname):
        return None
    proxies = getproxies()
    return proxies.get(parts.scheme) or proxies.get("all")


def connect_failure(exc: BaseException) -> str:
    """Why a connection failed, from the causes aiohttp chains (refused, unknown host)."""
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending:
        cause = pending.pop()
        if id(cause) in seen:
            continue
        seen.add(id(cause))
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, socket.gaierror):
            return f"unknown host ({cause.strerror})"
        if isinstance(cause, BaseExceptionGroup):
            pending.extend(cause.exceptions)
        pending.extend(c for c in (cause.__cause__, cause.__context__) if c is not None)
    return str(exc) or type(exc).__name__


async def _drain_then_close(response: aiohttp.ClientResponse) -> None:
    """Read what follows `[DONE]` (the body's end) so that the connection can go back to the
    pool, then close the response (a body not ended by then closes its connection)."""
    try:
        with contextlib.suppress(TimeoutError, aiohttp.ClientError):
            async with asyncio.timeout(DRAIN_S):
                while await response.content.readany():
                    pass
    finally:
        response.close()
