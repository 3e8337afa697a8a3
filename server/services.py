"""What every session of one process shares: its dependencies (settings, store, hub, metrics,
generator), fixed at start, and the process's mutable state behind verbs."""

from __future__ import annotations

from dataclasses import dataclass

from protocol.conversation.chats import Claims
from protocol.conversation.limits import UserBudgets
from protocol.conversation.load import Load
from server.admission import Admission
from server.auth import Verifier
from server.catalogue import CatalogueKeeper
from server.generators import ReplyGenerator
from server.hub import Hub
from server.metrics import Metrics
from server.settings import Settings
from server.store import Store


class ProcessState:
    """What the process's sessions change together: who may connect (and the drain), the chat
    ids being answered, the users' history budgets, whether notifications are coming, and
    whether new chats are shed (the load, sampled by the app's monitor)."""

    __slots__ = ("_listening", "admission", "claims", "history_budgets", "load")

    def __init__(self, settings: Settings) -> None:
        self.admission = Admission(settings.max_preauth, settings.max_preauth_per_ip)
        self.claims = Claims()
        self.history_budgets = UserBudgets(
            settings.history_bytes_per_s, settings.history_burst_bytes
        )
        self.load = Load(
            settings.overload_lag_ms / 1000, settings.overload_calm_s, settings.db_timeout_s
        )
        self._listening = True

    @property
    def listening(self) -> bool:
        """Whether persona changes of other processes are being notified (else caches are not
        trusted: every read reloads)."""
        return self._listening

    def listener_changed(self, up: bool) -> bool:
        """Record the listener's state; True when it changed."""
        changed = up != self._listening
        self._listening = up
        return changed

    def begin_drain(self) -> None:
        self.admission.begin_drain()


@dataclass(frozen=True, slots=True)
class Services:
    """The process-wide pieces a session works with; `state` is the part that changes."""

    settings: Settings
    store: Store
    hub: Hub
    metrics: Metrics
    generator: ReplyGenerator
    secret: str
    verifier: Verifier  # checks tokens: `hello`, and the HTTP API's bearer tokens
    version: str
    origin: str  # this process's tag on the persona changes it notifies
    state: ProcessState
    catalogue: CatalogueKeeper  # this process's copy of the persona catalogue, kept current
