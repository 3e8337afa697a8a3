"""Where the bots connect from and to: the instances of a run (WebSocket and HTTP API URLs), the
loopback source addresses they spread over, the connect gate of each source, and the backoff
of a refused handshake."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_API_PORT = 8766
PER_SOURCE = 16  # handshakes in flight per source address and instance (the server allows 32)
MAX_SOURCES = 250  # 127.0.0.1 to 127.0.0.250
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 2.0
RETRY_STATUSES = frozenset({429, 503})  # refused for now: too many waiting, or shutting down


@dataclass(frozen=True, slots=True)
class Target:
    """One instance of the server: its WebSocket URL and its HTTP API's base URL."""

    url: str
    api_url: str


def default_api_url(ws_url: str, port: int = DEFAULT_API_PORT) -> str:
    """The HTTP API beside a WebSocket URL: the same host, `http(s)://`, port 8766."""
    parts = urlsplit(ws_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    host = parts.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def targets_of(urls: Sequence[str], api_urls: Sequence[str] = ()) -> tuple[Target, ...]:
    """The instances, `api_urls` paired with `urls` in order (the default for the ones left)."""
    if len(api_urls) > len(urls):
        raise ValueError("more API URLs than WebSocket URLs: pair each --api-url with a --url")
    apis = [*api_urls, *(default_api_url(url) for url in urls[len(api_urls) :])]
    return tuple(Target(url, api.rstrip("/")) for url, api in zip(urls, apis, strict=True))


def is_loopback_url(url: str) -> bool:
    """Whether the URL's host is an IPv4 loopback address, written as one (a name such as
    `localhost` may resolve to ::1, which has no other source address to spread over)."""
    host = urlsplit(url).hostname or ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return isinstance(address, ipaddress.IPv4Address) and address.is_loopback


def loopback_sources(concurrency: int, per_source: int) -> tuple[str, ...]:
    """Enough loopback source addresses for `concurrency` handshakes at `per_source` each."""
    count = min(MAX_SOURCES, max(1, math.ceil(concurrency / max(1, per_source))))
    return tuple(f"127.0.0.{n}" for n in range(1, count + 1))


class Gates:
    """A semaphore per (source address, instance): how many handshakes of one source may wait
    for their `welcome` at one server at once."""

    def __init__(self, per_source: int) -> None:
        self._per_source = max(1, per_source)
        self._gates: dict[tuple[str | None, str], asyncio.Semaphore] = {}

    def of(self, source: str | None, url: str) -> asyncio.Semaphore:
        key = (source, url)
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = asyncio.Semaphore(self._per_source)
        return gate


def retry_delay_s(attempt: int, retry_after: str | None = None) -> float:
    """How long to wait before handshake attempt `attempt + 1`: exponential with full jitter,
    at least a `Retry-After` the server sent (capped at RETRY_MAX_S as well)."""
    ceiling = min(RETRY_MAX_S, RETRY_FIRST_S * 2.0**attempt)
    delay = random.uniform(ceiling / 2.0, ceiling)
    if retry_after is not None:
        with contextlib.suppress(ValueError):
            delay = max(delay, min(RETRY_MAX_S, float(retry_after)))
    return delay
