"""Who may connect now: the process's budget of unauthenticated connections, per client address
and in all, and whether the process is draining."""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Sequence

IPV6_PREFIX = 64  # an IPv6 client usually holds a whole /64: its addresses count as one


def client_address(
    peer: object,
    forwarded_for: str | None,
    trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> str:
    """The address a connection is counted under.

    `peer` is the socket's remote address (a tuple whose first item is the host). Behind a
    trusted proxy (`CHAT_TRUSTED_PROXIES`), the right-most `X-Forwarded-For` entry that is not
    itself a trusted proxy is the client. IPv6 addresses count by their /64.
    """
    host = peer[0] if isinstance(peer, tuple) and peer else str(peer or "")
    if forwarded_for and _is_trusted(host, trusted):
        for hop in reversed(forwarded_for.split(",")):
            hop = hop.strip()
            if hop and not _is_trusted(hop, trusted):
                host = hop
                break
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host[:64]  # a Unix socket, or a forwarded entry that is not an address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else str(ip)


def _is_trusted(
    host: str, trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    if not trusted:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


class Admission:
    """The connections of this process that have not authenticated yet, counted per client
    address (so that one client cannot use up the budget of everyone) and in all (a backstop),
    and the drain that refuses new ones. Pure: no I/O."""

    __slots__ = ("_by_address", "_draining", "_total", "max_per_address", "max_total")

    def __init__(self, max_total: int, max_per_address: int) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self._by_address: Counter[str] = Counter()
        self._total = 0
        self._draining = False

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def preauth(self) -> int:
        """Connections that have not sent a valid `hello` yet."""
        return self._total

    def begin_drain(self) -> None:
        """From now on new connections are refused and new chats answered `unavailable`."""
        self._draining = True

    def refusal(self, address: str) -> tuple[int, str] | None:
        """Why a handshake from `address` cannot be taken now (HTTP status, reason), or None."""
        if self._draining:
            return 503, "shutting down"
        if self._by_address[address] >= self.max_per_address:
            return 429, (
                f"too many connections waiting to authenticate from your address"
                f" ({self.max_per_address})"
            )
        if self._total >= self.max_total:
            return 503, f"too many connections waiting to authenticate ({self.max_total})"
        return None

    def admit(self, address: str) -> bool:
        """Count a new connection from `address` until it authenticates or goes; False (and
        nothing counted) when that address or the process is at its budget."""
        if self._by_address[address] >= self.max_per_address or self._total >= self.max_total:
            return False
        self._by_address[address] += 1
        self._total += 1
        return True

    def authenticated(self, address: str) -> None:
        """A connection counted by `admit` has authenticated, or is gone."""
        left = self._by_address[address] - 1
        if left > 0:
            self._by_address[address] = left
        else:
            del self._by_address[address]
        self._total -= 1
