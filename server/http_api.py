"""The HTTP API (FastAPI): the avatar, its persona, the catalogue and the history over HTTP,
with the same models, rules, store and hub as the frames. Served by server/http_server.py."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Collection
from typing import Annotated, Any, cast

import orjson
from fastapi import APIRouter, Depends, FastAPI, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from protocol.conversation.core import HISTORY_REQUEST_BYTES
from protocol.conversation.records import SwitchRequest, SwitchResult
from protocol.errors import AvatarExists, ConnectionRefused, InvalidPersona, NoAvatar, ProtocolError
from protocol.frames import (
    MAX_HISTORY_LIMIT,
    MAX_MESSAGE_ID,
    MAX_NAME_CHARS,
    MAX_TOKEN_CHARS,
    AvatarInfo,
    HistoryEntry,
    PersonaInfo,
    Personality,
    Text,
    fit_history_page,
)
from protocol.personas import Catalogue
from server.auth import CannotVerify
from server.batching import settle
from server.http_server import BodyLimit, Cors
from server.services import Services

TITLE = "Persona chat"
RETRY_AFTER_S = 5  # what a 503 tells a client to wait


# ---------------------------------------------------------------- models


def enabled_persona(catalogue: Catalogue, personality: str) -> str:
    """The live catalogue's rule, as the frames apply it: a 422 whose error type is
    `invalid_persona` (the field's error, as FastAPI gives one) unless it is enabled."""
    try:
        catalogue.require_enabled(personality)
    except InvalidPersona as exc:
        raise RequestValidationError(
            [
                {
                    "type": "invalid_persona",
                    "loc": ("body", "personality"),
                    "msg": exc.message,
                    "input": personality,
                }
            ]
        ) from None
    return personality


KnownPersonality = Annotated[
    Personality, Field(description="an enabled persona's id (GET /personas lists them)")
]


class Body(BaseModel):
    """A request body: strict types, and no unknown fields (as the frames)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class NewAvatar(Body):
    name: Annotated[Text, Field(min_length=1, max_length=MAX_NAME_CHARS)]
    personality: KnownPersonality


class PersonaChoice(Body):
    personality: KnownPersonality


class PersonaSwitched(BaseModel):
    personality: str
    previous: str
    avatar: AvatarInfo


class MessagePage(BaseModel):
    """Oldest first; page on with `before` set to the first one's id."""

    messages: list[HistoryEntry]


class Problem(BaseModel):
    detail: str


# ---------------------------------------------------------------- per-user request rate


class UserRates:
    """A token bucket per user (the socket's rate and burst), shared by the user's requests to
    this process; idle users are forgotten now and then."""

    SWEEP_EVERY = 1024

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # user: (tokens, when)
        self._sweep_at = self.SWEEP_EVERY

    def wait_s(self, user_id: str, now: float) -> float:
        """0 (and a token spent) when the user may make a request now; else how long until."""
        tokens, when = self._buckets.get(user_id, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - when) * self.rate)
        if tokens >= 1.0:
            self._buckets[user_id] = (tokens - 1.0, now)
            if len(self._buckets) >= self._sweep_at:
                self._sweep(now)
            return 0.0
        self._buckets[user_id] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _sweep(self, now: float) -> None:
        full_after = self.burst / self.rate
        self._buckets = {u: b for u, b in self._buckets.items() if now - b[1] < full_after}
        self._sweep_at = len(self._buckets) + self.SWEEP_EVERY


# ---------------------------------------------------------------- dependencies

bearer = HTTPBearer(auto_error=False, description="A JWT, as in `hello`")


def services_of(request: Request) -> Services:
    return cast(Services, request.app.state.services)


ServicesDep = Annotated[Services, Depends(services_of)]


def unauthorized(reason: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, reason, headers={"WWW-Authenticate": "Bearer"}
    )


async def current_user(
    request: Request,
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    """The user of the bearer token, checked as `hello` checks it; within the request rate."""
    if credentials is None:
        raise unauthorized("not authenticated: send Authorization: Bearer <token>")
    token = credentials.credentials
    if len(token) > MAX_TOKEN_CHARS:
        raise unauthorized(f"token longer than {MAX_TOKEN_CHARS} characters")
    try:
        user_id = await services.verifier.verify(token)
    except CannotVerify as exc:
        raise HTTPException(503, exc.reason, headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except ConnectionRefused as exc:
        raise unauthorized(exc.reason) from None
    rates: UserRates = request.app.state.rates
    wait_s = rates.wait_s(user_id, time.monotonic())
    if wait_s > 0:
        raise too_many("too many requests; slow down", wait_s)
    return user_id


User = Annotated[str, Depends(current_user)]


def too_many(detail: str, wait_s: float) -> HTTPException:
    return HTTPException(429, detail, headers={"Retry-After": str(max(1, math.ceil(wait_s)))})


# ---------------------------------------------------------------- routes

router = APIRouter()
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "No token, or a bad one"},
    429: {"model": Problem, "description": "Over the per-user request rate"},
    503: {"model": Problem, "description": "The database or the token keys are unreachable"},
}
NO_AVATAR = "this user has no avatar yet; POST /avatars first"


@router.get("/avatars/me", response_model=AvatarInfo, responses={404: {"model": Problem}})
async def get_avatar(user: User, services: ServicesDep) -> AvatarInfo:
    """The user's avatar."""
    avatar = await services.store.get_avatar(user)
    if avatar is None:
        raise NoAvatar(NO_AVATAR)
    return avatar.info()


@router.post(
    "/avatars",
    status_code=201,
    response_model=AvatarInfo,
    responses={409: {"model": Problem}},
)
async def create_avatar(body: NewAvatar, user: User, services: ServicesDep) -> JSONResponse:
    """Create the user's avatar (one per user)."""
    store = services.store
    enabled_persona(services.catalogue.catalogue, body.personality)
    if await store.open_user(user) is not None:  # also creates the user on first sight
        raise AvatarExists()
    avatar = await store.create_avatar(user, body.name, body.personality)
    return JSONResponse(
        avatar.info().model_dump(mode="json"), 201, headers={"Location": "/avatars/me"}
    )


@router.patch(
    "/avatars/me/persona", response_model=PersonaSwitched, responses={404: {"model": Problem}}
)
async def set_persona(body: PersonaChoice, user: User, services: ServicesDep) -> PersonaSwitched:
    """Switch the avatar's persona. Every open session of the user, in every process, is told
    with `persona_changed`, and its next reply uses the new persona; those in this process
    drop their cached avatar before this answers."""
    enabled_persona(services.catalogue.catalogue, body.personality)
    result = await switch_persona(services, user, body.personality)
    if result is None:
        raise NoAvatar(NO_AVATAR)
    return PersonaSwitched(
        personality=result.avatar.personality, previous=result.previous, avatar=result.avatar.info()
    )


def switch_persona(
    services: Services, user_id: str, personality: str
) -> asyncio.Future[SwitchResult | None]:
    """The switch through the store's group commit, as a socket's (so other processes are
    notified by the database); the user's sessions here are told the moment it commits, even
    if the request that asked for it is gone by then."""
    future: asyncio.Future[SwitchResult | None] = asyncio.get_running_loop().create_future()
    answer = settle(future)

    def done(result: SwitchResult | None, error: BaseException | None) -> None:
        if result is not None:
            services.metrics.persona_switches.inc()
            avatar = result.avatar
            services.hub.persona_changed(
                user_id, avatar.personality, result.previous, avatar.version
            )
        answer(result, error)

    services.store.add_switch(SwitchRequest(user_id, personality, services.origin), done)
    return future


@router.get("/personas", response_model=list[PersonaInfo])
async def personas(user: User, services: ServicesDep) -> list[PersonaInfo]:
    """The enabled personas of the catalogue."""
    return list(services.catalogue.catalogue.listing())


@router.get("/avatars/me/messages", response_model=MessagePage)
async def messages(
    user: User,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=MAX_HISTORY_LIMIT)] = 50,
    before: Annotated[int | None, Query(ge=1, le=MAX_MESSAGE_ID)] = None,
) -> Response:
    """A page of the user's messages, oldest first: the `limit` newest older than `before`.
    Paid for from the user's history budget, as the `history` frame is."""
    budget = services.state.history_budgets.of(user, time.monotonic())
    wait_s = budget.wait_s(time.monotonic())
    if wait_s > 0:
        raise too_many("too much history asked for; wait before asking again", wait_s)
    budget.spend(HISTORY_REQUEST_BYTES, time.monotonic())
    found = await services.store.history(user, limit, before)
    body = MessagePage(messages=fit_history_page(found)).model_dump_json().encode()
    budget.spend(len(body), time.monotonic())
    return Response(body, media_type="application/json")


# ---------------------------------------------------------------- errors


async def protocol_error(request: Request, exc: Exception) -> Response:
    """A protocol error (from the store, or a rule) as FastAPI answers: its status and detail."""
    error = cast(ProtocolError, exc)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status == 503 else None
    return JSONResponse({"detail": error.message}, error.status, headers=headers)


async def validation_error(request: Request, exc: Exception) -> Response:
    """FastAPI's 422 with its list of errors; a body that is not JSON at all is a 400."""
    errors = cast(RequestValidationError, exc).errors()
    code = 400 if any(e.get("type") == "json_invalid" for e in errors) else 422
    try:
        body = orjson.dumps({"detail": errors}, default=str)
    except TypeError:  # the errors quote the input, and it held a lone surrogate ("\ud800")
        body = orjson.dumps({"detail": _encodable(errors)}, default=str)
    return Response(body, code, media_type="application/json")


def _encodable(value: object) -> object:
    """`value` with every string made valid UTF-8 (a lone surrogate becomes "?")."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {_encodable(key): _encodable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_encodable(item) for item in value]
    return value


# ---------------------------------------------------------------- the app


def create_api(version: str, origins: Collection[str] = ()) -> FastAPI:
    """The API, with no services yet (`app.state.services` is set when it is served); the
    OpenAPI document needs none."""
    api = FastAPI(
        title=TITLE,
        version=version,
        description="The HTTP side of the persona chat server: the same avatar, persona switch "
        "and history as the WebSocket frames, for apps that change settings outside a chat.",
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    api.include_router(router, responses=ERRORS)
    api.add_exception_handler(ProtocolError, protocol_error)
    api.add_exception_handler(RequestValidationError, validation_error)
    api.add_middleware(BodyLimit)
    api.add_middleware(Cors, origins=origins)  # outermost: every answer gets its headers
    return api


def attach(api: FastAPI, services: Services) -> FastAPI:
    settings = services.settings
    api.state.services = services
    api.state.rates = UserRates(settings.rate_per_s, settings.rate_burst)
    return api


def openapi_schema(version: str) -> dict[str, Any]:
    return create_api(version).openapi()
