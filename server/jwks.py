"""The JSON Web Key Set that asymmetric tokens are checked against: fetched with httpx (never
blocking the loop), cached, refreshed in the background, and fetched again for an unknown `kid`
at most once per 30 s."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt

from server.logs import Throttled

log = logging.getLogger(__name__)

ALGORITHMS = frozenset({"ES256", "RS256", "EdDSA"})  # what a key of the set may verify
UNKNOWN_KID_REFETCH_S = 30.0  # an unknown `kid` fetches the set again at most this often
FETCH_TIMEOUT_S = 5.0
RETRY_FIRST_S = 0.5  # while the set cannot be fetched: the first wait, doubled up to the cap
RETRY_MAX_S = 30.0


class KeysUnavailable(Exception):
    """The key set cannot be had now (never fetched, or its last fetch failed): tokens signed
    with a key not in hand cannot be checked."""


def usable_keys(document: Any) -> dict[str, jwt.PyJWK]:
    """The keys of a JWKS document that may verify tokens, by `kid`: asymmetric signing keys of
    the accepted algorithms only (a symmetric key published in a key set is never trusted)."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document (no `keys` list)")
    found: dict[str, jwt.PyJWK] = {}
    for data in document["keys"]:
        if not isinstance(data, dict) or data.get("kty") == "oct":
            continue
        if data.get("use", "sig") != "sig" or not isinstance(data.get("kid"), str):
            continue
        try:
            key = jwt.PyJWK(data)
        except jwt.PyJWTError:
            continue  # a key type or curve this server does not take
        if key.algorithm_name in ALGORITHMS:
            found[data["kid"]] = key
    if not found:
        raise ValueError("no usable signing key (ES256, RS256 or EdDSA, with a kid)")
    return found


class KeySet:
    """The keys of one JWKS URL, by `kid`. The set is fetched at start and every `max_age_s`,
    and again, at most once per 30 s, when a token names a `kid` it does not hold. While it
    cannot be fetched the keys in hand stay in use; with none in hand it is tried again with a
    growing wait (0.5 s to 30 s)."""

    def __init__(
        self,
        url: str,
        max_age_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._max_age_s = max_age_s
        self._clock = clock
        self._client = httpx.AsyncClient(timeout=FETCH_TIMEOUT_S)
        self._keys: dict[str, jwt.PyJWK] = {}
        self._last_ok = False  # whether the latest fetch succeeded
        self._kid_refetch_at = -UNKNOWN_KID_REFETCH_S  # when an unknown kid last fetched
        self._fetching: asyncio.Task[bool] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._failures = Throttled(log)
        self.fetches = 0

    @property
    def available(self) -> bool:
        """Whether any key is in hand (else no asymmetric token can be checked)."""
        return bool(self._keys)

    async def start(self) -> None:
        """Fetch the set once (a failure is logged, not raised), then keep it fresh."""
        await self.refresh()
        self._keeper = asyncio.create_task(self._keep(), name="jwks-keeper")

    async def aclose(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        if self._fetching is not None:
            await asyncio.gather(self._fetching, return_exceptions=True)
        await self._client.aclose()

    async def key(self, kid: str) -> jwt.PyJWK | None:
        """The key named `kid`; None when the set, fetched again if allowed, does not have it.
        KeysUnavailable when it cannot be had now."""
        key = self._keys.get(kid)
        if key is not None:
            return key
        now = self._clock()
        if self._fetching is None and now - self._kid_refetch_at >= UNKNOWN_KID_REFETCH_S:
            self._kid_refetch_at = now
            await self.refresh()
        elif self._fetching is not None:
            await asyncio.shield(self._fetching)
        key = self._keys.get(kid)
        if key is None and not self._last_ok:
            raise KeysUnavailable()
        return key

    async def refresh(self) -> bool:
        """Fetch the set now (one fetch at a time: callers share the one in flight); whether
        it succeeded."""
        if self._fetching is None:
            self._fetching = asyncio.create_task(self._fetch(), name="jwks-fetch")
        return await asyncio.shield(self._fetching)

    async def _fetch(self) -> bool:
        self.fetches += 1
        try:
            response = await self._client.get(self.url, headers={"Accept": "application/json"})
            response.raise_for_status()
            keys = usable_keys(response.json())
        except (httpx.HTTPError, ValueError) as exc:
            self._last_ok = False
            self._failures.warning(
                "jwks",
                "cannot fetch the JWKS from %s: %s",
                self.url,
                str(exc) or type(exc).__name__,
            )
            return False
        finally:
            self._fetching = None
        added = keys.keys() - self._keys.keys()
        self._keys = keys
        self._last_ok = True
        if added:
            log.info("JWKS from %s: keys %s", self.url, ", ".join(sorted(keys)))
        return True

    async def _keep(self) -> None:
        """Fetch again every `max_age_s`; while fetches fail, with a growing wait."""
        wait = RETRY_FIRST_S
        while True:
            if self._last_ok:
                wait = RETRY_FIRST_S
                await asyncio.sleep(self._max_age_s)
            else:
                await asyncio.sleep(wait)
                wait = min(wait * 2, RETRY_MAX_S)
            await self.refresh()
