"""What every session of one process shares: settings, store, hub, metrics, generator."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.admission import Admission
from server.generators import ReplyGenerator
from server.hub import Hub
from server.limits import UserBudgets
from server.metrics import Metrics
from server.settings import Settings
from server.store import Store


@dataclass(slots=True)
class Services:
    """The process-wide pieces a session works with."""

    settings: Settings
    store: Store
    hub: Hub
    metrics: Metrics
    generator: ReplyGenerator
    secret: str
    version: str
    admission: Admission  # connections not yet authenticated, and the drain
    history_budgets: UserBudgets  # bytes of history each user may still be served
    origin: str = ""  # this process's tag on the persona changes it notifies
    # False while the LISTEN connection is down: sessions then reload the avatar every time
    cache_trusted: bool = True
    # (user id, chat id) of every chat queued or being answered in this process
    chats_in_flight: set[tuple[str, str]] = field(default_factory=set)
