"""Tokens for the benchmark's users, signed by the benchmark itself.

The benchmark starts each server with a secret of its own choosing (`CHAT_JWT_SECRET`), so it
signs its users' tokens as the identity provider that the server trusts would: HS256, the user
id as `sub`. It needs nothing from server/ for that.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jwt


def signer(secret: str) -> Callable[[str], str]:
    """A function that signs a token for a user with `secret`."""

    def token_for(user: str) -> str:
        return jwt.encode({"sub": user, "iat": int(time.time())}, secret, algorithm="HS256")

    return token_for
