"""The server process: WebSocket and HTTP on one port, start-up, and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import mimetypes
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers, MultipleValuesError
from websockets.http11 import Request, Response

from protocol.errors import CloseCode
from server.admission import client_address
from server.auth import CANNOT_VERIFY, MAX_SUBJECT_CHARS, Verifier, accepts_hs256, mint_token
from server.catalogue import CatalogueKeeper
from server.generators import ReplyGenerator, TemplateGenerator
from server.http_api import attach, create_api
from server.http_server import HttpServer, bind, page_origins
from server.hub import Hub
from server.logs import Throttled
from server.metrics import CONTENT_TYPE, Metrics
from server.notify import ChangeListener, PersonaChange, process_tag
from server.outbox import WRITE_LIMIT
from server.services import ProcessState, Services
from server.session import Session
from server.settings import Settings
from server.startup import connect_store, page_url
from server.store.connections import unwatch_load, watch_load

if TYPE_CHECKING:
    from server.embedded import Keeper

log = logging.getLogger(__name__)

T = TypeVar("T")

WS_PATH = "/ws"
STATIC_PACKAGE = "server.static"
DEV_TOKEN_TTL_S = 24 * 3600
GC_THRESHOLDS = (20_000, 20, 20)  # young, middle, old; the default is (700, 10, 10)
LOAD_SAMPLE_S = 0.1  # how often the load monitor measures the event loop's lag


def server_version() -> str:
    try:
        return version("persona-chat")
    except PackageNotFoundError:
        return "0+unknown"


def make_generator(settings: Settings) -> ReplyGenerator:
    """The reply generator the settings name."""
    if settings.generator == "openai":
        from server.llm import OpenAIGenerator

        return OpenAIGenerator(settings)
    return TemplateGenerator(delay_s=settings.template_delay_ms / 1000)


def dev_token_enabled(settings: Settings) -> bool:
    """`GET /dev/token` exists only in development: embedded database, bound to loopback, and
    HS256 tokens taken."""
    return settings.database_url is None and is_loopback(settings.host) and accepts_hs256(settings)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_is_loopback(host_header: str | None) -> bool:
    """Whether a `Host` header names this machine by a loopback address or `localhost`."""
    if not host_header:
        return False
    try:
        hostname = urlsplit("//" + host_header).hostname
    except ValueError:  # a bad port, an unclosed bracket
        return False
    return hostname is not None and is_loopback(hostname)


def origin_allowed(
    origin: str | None, host_header: str | None, allowed: list[str], loopback_only: bool
) -> bool:
    """Browsers send `Origin`: accept the configured origins, and the server's own.

    The server's own origin is the one whose host is the `Host` header. While the server
    listens on loopback (`loopback_only`), that counts only for a loopback `Host`: a page on a
    name that rebinds to 127.0.0.1 sends its own name as both, and must not pass.
    """
    if origin is None:
        return True  # not a browser: native clients and bots send no Origin
    if origin in allowed:
        return True
    if loopback_only and not host_is_loopback(host_header):
        return False
    try:
        parsed = urlsplit(origin)
    except ValueError:  # "http://[::1", and the like
        return False
    return (
        parsed.scheme in ("http", "https")
        and host_header is not None
        and (parsed.netloc.lower() == host_header.lower())
    )


class App:
    """One server process: a store, a websockets server, and the sessions it holds."""

    def __init__(self, settings: Settings, dsn: str, secret: str) -> None:
        self.settings = settings
        self._dsn = dsn
        self._secret = secret
        self.metrics = Metrics(multiprocess_mode=settings.prometheus_multiproc_dir is not None)
        self.sessions: set[Session] = set()
        self._services: Services | None = None
        self._server: Server | None = None
        self._listener: ChangeListener | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._verifier = Verifier(settings, secret)
        self._api: HttpServer | None = None
        self._refusals = Throttled(log)  # a client reopening refused ones: a line per 5 s a kind
        self._routes: dict[str, Callable[[ServerConnection, Request], Awaitable[Response]]] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics,
            "/": self._index,
        }
        if dev_token_enabled(settings):
            self._routes["/dev/token"] = self._dev_token

    @property
    def services(self) -> Services:
        assert self._services is not None, "App.start() first"
        return self._services

    @property
    def port(self) -> int:
        assert self._server is not None, "App.start() first"
        port: int = next(iter(self._server.sockets)).getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"ws://{self.settings.host}:{self.port}{WS_PATH}"

    @property
    def api_port(self) -> int | None:
        """The HTTP API's port; None when it is off (`--api-port 0`)."""
        return None if self._api is None else self._api.port

    @property
    def api_url(self) -> str | None:
        return None if self._api is None else f"http://{self.settings.host}:{self._api.port}"

    async def start(self) -> None:
        settings = self.settings
        # an external database that is not up yet is waited for (CHAT_DB_WAIT_S)
        store = await connect_store(self._dsn, settings, self.metrics.commit_batch.observe)
        if settings.run_migrations:
            await store.migrate()
        await self._verifier.start()  # a JWKS that cannot be fetched is tried again later
        origin = process_tag()
        catalogue = CatalogueKeeper(store, origin)
        await catalogue.load()
        self._services = Services(
            settings=settings,
            store=store,
            hub=Hub(),
            metrics=self.metrics,
            generator=make_generator(settings),
            secret=self._secret,
            verifier=self._verifier,
            version=server_version(),
            origin=origin,
            state=ProcessState(settings),
            catalogue=catalogue,
        )
        self._listener = ChangeListener(
            self._dsn,
            self.services.origin,
            self._on_persona_change,
            self._on_listener_state,
            settings.db_timeout_s,
            catalogue.notified,
        )
        await self._listener.start()
        self._server = await serve(
            self._handle,
            settings.host,
            settings.port,
            process_request=self._process_request,
            max_size=settings.max_frame_bytes,
            ping_interval=settings.ping_interval_s,
            ping_timeout=settings.ping_timeout_s,
            close_timeout=2,
            compression=None,
            write_limit=WRITE_LIMIT,
            server_header=f"persona-chat/{self.services.version}",
            reuse_port=settings.reuse_port,
        )
        await self._start_api()
        self._ticker = asyncio.create_task(self._tick(), name="metrics-ticker")
        load = self.services.state.load
        self.metrics.watch(load)
        watch_load(load)
        self._monitor = asyncio.create_task(self._watch_load(), name="load-monitor")
        log.info("listening on %s; the web page: %s", self.url, page_url(settings.host, self.port))

    async def _start_api(self) -> None:
        """The HTTP API on its own port, in this loop, sharing the store, hub and settings."""
        settings = self.settings
        if not settings.api_port:
            return
        origins = page_origins(
            settings.host, self.port, settings.allowed_origins, self._loopback_only
        )
        api = attach(create_api(self.services.version, origins), self.services)
        sock = bind(settings.host, settings.api_port, settings.reuse_port)
        self._api = HttpServer(api, sock, settings.drain_timeout_s)
        await self._api.start()
        log.info("HTTP API on %s (OpenAPI at /docs)", self.api_url)

    async def _handle(self, ws: ServerConnection) -> None:
        # no local keeps the handshake's headers: the session empties them once it has read them
        address = self.client_address(
            ws.remote_address, ws.request.headers if ws.request is not None else Headers()
        )
        session = Session(self.services, ws, address)
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)

    async def stop(self) -> None:
        """Stop accepting, let replies in flight finish (bounded), close sessions with 1001."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close(close_connections=False)
        if self._ticker is not None:
            self._ticker.cancel()
        if self._monitor is not None:
            self._monitor.cancel()
        unwatch_load(self.services.state.load)
        api, self._api = self._api, None  # requests in flight finish, as replies do
        api_stopped = asyncio.create_task(api.stop()) if api is not None else None
        services = self.services
        services.state.begin_drain()  # new connections are refused
        for session in tuple(self.sessions):
            session.begin_drain()  # new chats get `unavailable`; queued ones are answered
        deadline = asyncio.get_running_loop().time() + self.settings.drain_timeout_s
        while any(not s.idle for s in self.sessions):
            if asyncio.get_running_loop().time() > deadline:
                log.warning("drain timeout: cancelling replies still in flight")
                break
            await asyncio.sleep(0.02)
        await asyncio.gather(
            *(s.close(CloseCode.GOING_AWAY, "server shutting down") for s in tuple(self.sessions)),
            return_exceptions=True,
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), self.settings.drain_timeout_s)
        if api_stopped is not None:
            await api_stopped
        await services.generator.aclose()
        await services.verifier.aclose()
        if self._listener is not None:
            await self._listener.stop()
        await services.catalogue.aclose()
        await services.store.close()
        self.metrics.fold()  # what the drain counted, into a worker's files before it exits
        log.info("stopped")

    async def _tick(self) -> None:
        """Gauges that are read rather than counted, refreshed every second, and the counts
        of the second folded in (for `serve --workers N`, where another worker answers the
        scrape)."""
        while True:
            self.metrics.pool_in_use.set(self.services.store.pool_in_use)
            self.metrics.fold()
            await asyncio.sleep(1.0)

    async def _watch_load(self) -> None:
        """Measure how late the event loop runs a timer, for the process's load: past the
        threshold (`CHAT_OVERLOAD_LAG_MS`), new chats are refused as `overloaded`."""
        load = self.services.state.load
        clock = time.monotonic
        due = clock() + LOAD_SAMPLE_S
        load.sample(0.0, clock(), due)
        while True:
            await asyncio.sleep(max(0.0, due - clock()))
            now = clock()
            lag, due = max(0.0, now - due), now + LOAD_SAMPLE_S
            if load.sample(lag, now, due):
                if load.shedding:
                    log.warning(
                        "overloaded: the event loop lags %.0f ms; new chats are refused", lag * 1000
                    )
                else:
                    log.info("no longer overloaded: new chats are taken again")

    def _on_persona_change(self, change: PersonaChange) -> None:
        """A persona switch committed by another process."""
        self.metrics.notifications.inc()
        self.services.hub.persona_changed(
            change.user_id, change.personality, change.previous, change.version
        )

    def _on_listener_state(self, up: bool) -> None:
        services = self.services
        if services.state.listener_changed(up):
            services.hub.listener_changed(up)  # down: read every time; up: some were missed
            services.catalogue.listener_changed(up)
        self.metrics.listener_up.set(1 if up else 0)

    # ------------------------------------------------------------------ HTTP

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        path = request.path.partition("?")[0]
        try:
            if path == WS_PATH:
                return self._check_handshake(connection, request)
            route = self._routes.get(path)
            if route is not None:
                return await route(connection, request)
        except MultipleValuesError as exc:
            header = str(exc).strip("'")
            self._refusals.warning("header", "refused a request with a repeated %s header", header)
            return connection.respond(400, f"the {header} header must appear once\n")
        if path.startswith("/static/"):
            return static_file(connection, path.removeprefix("/static/"))
        return connection.respond(404, "not found\n")

    def _check_handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        """None to go on with a WebSocket handshake; else the HTTP answer that refuses it."""
        origin = request.headers.get("Origin")
        host = request.headers.get("Host")
        address = self.client_address(connection.remote_address, request.headers)
        refusal = self._over_capacity(address)
        if refusal is not None:
            status, reason = refusal
            self._refusals.warning(
                f"capacity {status}", "refused a WebSocket handshake: %s", reason
            )
            return connection.respond(status, reason + "\n")
        if not origin_allowed(origin, host, self.settings.allowed_origins, self._loopback_only):
            self._refusals.warning(
                "origin", "refused a WebSocket handshake from origin %r (Host %r)", origin, host
            )
            return connection.respond(403, "origin not allowed\n")
        return None

    @property
    def _loopback_only(self) -> bool:
        """Listening on loopback: only loopback names are this server's own (DNS rebinding)."""
        return is_loopback(self.settings.host)

    def client_address(self, peer: object, headers: Headers) -> str:
        """The address a connection counts under for the per-address limits."""
        forwarded = ",".join(headers.get_all("X-Forwarded-For"))
        return client_address(peer, forwarded, self.settings.trusted_proxies)

    def _over_capacity(self, address: str) -> tuple[int, str] | None:
        """Why a new connection from `address` cannot be taken now (HTTP status and reason)."""
        settings = self.settings
        if len(self.sessions) >= settings.max_connections:
            return 503, f"at the connection limit ({settings.max_connections})"
        return self.services.state.admission.refusal(address)

    async def _healthz(self, connection: ServerConnection, request: Request) -> Response:
        return connection.respond(200, "ok\n")

    async def _readyz(self, connection: ServerConnection, request: Request) -> Response:
        if not self.services.verifier.ready:
            return connection.respond(503, CANNOT_VERIFY + ": the JWKS cannot be fetched\n")
        if await self.services.store.ping():
            return connection.respond(200, "ready\n")
        return connection.respond(503, "database unreachable\n")

    async def _metrics(self, connection: ServerConnection, request: Request) -> Response:
        response = connection.respond(200, "")
        return with_body(response, self.metrics.render(), CONTENT_TYPE)

    async def _index(self, connection: ServerConnection, request: Request) -> Response:
        return static_file(connection, "index.html")

    async def _dev_token(self, connection: ServerConnection, request: Request) -> Response:
        # Only this machine's own names: a page on a name that rebinds to 127.0.0.1 would get a
        # token for any user otherwise.
        if not host_is_loopback(request.headers.get("Host")):
            self._refusals.warning(
                "dev token", "refused /dev/token for Host %r", request.headers.get("Host")
            )
            return connection.respond(403, "/dev/token answers only for a loopback Host\n")
        users = parse_qs(urlsplit(request.path).query).get("user", [])
        user = users[0] if users else ""
        if not 1 <= len(user) <= MAX_SUBJECT_CHARS or "\x00" in user:
            return connection.respond(400, f"user must have 1 to {MAX_SUBJECT_CHARS} characters\n")
        token = mint_token(self._secret, user, DEV_TOKEN_TTL_S)
        body = orjson.dumps({"user": user, "token": token})
        return with_body(connection.respond(200, ""), body, "application/json")


def static_file(connection: ServerConnection, name: str) -> Response:
    """A file shipped in server/static; 404 for anything else (no paths, no dot files)."""
    if "/" in name or "\\" in name or name.startswith((".", "_")):
        return connection.respond(404, "not found\n")
    resource = resources.files(STATIC_PACKAGE).joinpath(name)
    try:
        if not resource.is_file():
            return connection.respond(404, "not found\n")
    except (OSError, ValueError):  # a name too long for the file system, and the like
        return connection.respond(404, "not found\n")
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if content_type.startswith("text/") or content_type.endswith("javascript"):
        content_type += "; charset=utf-8"
    return with_body(connection.respond(200, ""), resource.read_bytes(), content_type)


def with_body(response: Response, body: bytes, content_type: str) -> Response:
    """A copy of `response` with another body and content type."""
    headers = Headers(response.headers)
    del headers["Content-Type"]
    del headers["Content-Length"]
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    return Response(response.status_code, response.reason_phrase, headers, body)


async def serve_until_signalled(
    app: App, on_ready: Callable[[App], None], keeper: Keeper | None = None
) -> None:
    """Run `app` until SIGINT or SIGTERM, then stop it gracefully. `keeper` restarts the
    embedded database should it stop meanwhile."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await app.start()
    watching = None if keeper is None else asyncio.create_task(keeper.watch(), name="keeper")
    tune_gc()
    on_ready(app)
    try:
        await stop.wait()
        log.info("signal received: draining")
    finally:
        await app.stop()
        if watching is not None:
            watching.cancel()


def tune_gc() -> None:
    """Leave what start-up made out of the cyclic collector's scans, and collect the young
    generation less often.

    Profiled at 500 busy sessions, the default collector used about 5% of the server's CPU in
    600 young collections a run and paused 50-65 ms for each full one (p99 is made of such
    pauses). Frozen and with a larger young generation, it ran 15 young collections for 20 ms
    in all, and full collections paused about 25 ms.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
