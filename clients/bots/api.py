"""The bots' HTTP side: `PATCH /avatars/me/persona` on an instance's HTTP API, one pooled client
for the whole run."""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
import orjson

PERSONA_PATH = "/avatars/me/persona"
MAX_CONNECTIONS = 100


@dataclass(frozen=True, slots=True)
class Answer:
    """What a PATCH got: the status (0 when no answer came) and the JSON body, if any."""

    status: int
    body: dict[str, Any]
    retry_after: str | None = None
    error: str = ""  # why no answer came (the exception's name)


class Api:
    """One pooled HTTP client shared by the bots of a run (keep-alive per instance)."""

    def __init__(self, timeout_s: float) -> None:
        self._client = httpx.AsyncClient(
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS),
            trust_env=False,
        )

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._client.aclose()

    async def set_persona(self, api_url: str, token: str, personality: str) -> Answer:
        """Switch the avatar of `token`'s user through `api_url`'s HTTP API."""
        try:
            response = await self._client.patch(
                api_url + PERSONA_PATH,
                content=orjson.dumps({"personality": personality}),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:
            return Answer(0, {}, error=type(exc).__name__)
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            body = {}
        return Answer(
            response.status_code,
            body if isinstance(body, dict) else {},
            response.headers.get("Retry-After"),
        )
