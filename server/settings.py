"""The one settings object: environment (`CHAT_*`, `DATABASE_URL`), overridden by run.py flags."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

import annotated_types
from pydantic import (
    AliasChoices,
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from protocol.frames import MAX_TEXT_CHARS


class Settings(BaseSettings):
    """Every knob of the server. No other module reads the environment."""

    model_config = SettingsConfigDict(env_prefix="CHAT_", extra="ignore")

    # where to listen and where data lives
    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)
    reuse_port: bool = False  # set for the workers of `serve --workers N`
    data_dir: Path = Path(".data")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # database: an external PostgreSQL when set, else the embedded one in data_dir
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "CHAT_DATABASE_URL")
    )
    db_pool_min: int = Field(default=2, ge=1)
    # the three group commits (turns, switches, avatar reads) may each hold a connection while
    # their batches keep coming: at least one more is left for everything else
    db_pool_max: int = Field(default=10, ge=4)
    db_timeout_s: float = Field(default=5.0, gt=0)
    # an external database that is not up yet is waited for this long at start-up
    db_wait_s: float = Field(default=30.0, ge=0)
    run_migrations: bool = True  # workers under a supervisor leave this to it
    # prometheus-client's multiprocess mode (set by `serve --workers N`)
    prometheus_multiproc_dir: Path | None = Field(
        default=None, validation_alias=AliasChoices("PROMETHEUS_MULTIPROC_DIR")
    )

    # authentication
    jwt_secret: SecretStr | None = None
    hello_timeout_s: float = Field(default=10.0, gt=0)

    # limits
    max_connections: int = Field(default=20_000, ge=1)
    max_connections_per_user: int = Field(default=16, ge=1)
    max_preauth: int = Field(default=512, ge=1)
    # per client address (IPv6: per /64), so that one client cannot lock everyone out
    max_preauth_per_ip: int = Field(default=32, ge=1)
    # proxies whose X-Forwarded-For names the client (for the per-address limit)
    trusted_proxies: list[IPvAnyNetwork] = Field(default_factory=list)
    max_frame_bytes: int = Field(default=64 * 1024, ge=1024)
    max_text_chars: int = MAX_TEXT_CHARS
    rate_per_s: float = Field(default=20.0, gt=0)
    rate_burst: int = Field(default=40, ge=1)
    abuse_close_after: int = Field(default=50, ge=1)
    chat_queue_depth: int = Field(default=8, ge=1)
    # history pages served per user (all the user's connections in this process), in bytes
    history_bytes_per_s: int = Field(default=128 * 1024, ge=1024)
    history_burst_bytes: int = Field(default=512 * 1024, ge=64 * 1024)
    ping_interval_s: float = Field(default=20.0, gt=0)
    ping_timeout_s: float = Field(default=20.0, gt=0)
    send_timeout_s: float = Field(default=10.0, gt=0)
    outbox_limit_bytes: int = Field(default=1024 * 1024, ge=64 * 1024)
    drain_timeout_s: float = Field(default=10.0, gt=0)
    # load shedding (protocol/conversation/load.py): new chats are answered `overloaded` once
    # the event loop lags this much twice in a row, until it has lagged under half of it for
    # overload_calm_s; 0 never sheds
    overload_lag_ms: float = Field(default=200.0, ge=0)
    overload_calm_s: float = Field(default=1.0, gt=0)

    # the HTTP API (server/http_api.py), on uvicorn in the same loop; 0 turns it off
    api_port: int = Field(default=8766, ge=0, le=65535)
    # tokens checked against a JWKS (ES256, RS256, EdDSA, chosen by `kid`); HS256 is then
    # refused unless jwt_secret is set too. `aud` and `iss` are checked when set.
    jwt_jwks_url: str | None = None
    jwt_jwks_max_age_s: float = Field(default=600.0, gt=0)  # how often the set is fetched
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    # whether HS256 tokens are taken; unset: decided as above (set for the workers of
    # `serve --workers N`, whose jwt_secret the supervisor always sets)
    jwt_hs256: bool | None = None

    # browsers: origins allowed besides the server's own (same-origin is always allowed)
    allowed_origins: list[str] = Field(default_factory=list)

    # replies
    generator: Literal["template", "openai"] = "template"
    template_delay_ms: float = Field(default=0.0, ge=0)
    history_turns: int = Field(default=6, ge=0)
    history_chars: int = Field(default=8000, ge=0)
    delta_flush_ms: float = Field(default=20.0, ge=0)
    delta_flush_chars: int = Field(default=64, ge=1)

    # the prompt after a persona switch: replies in an older persona's voice are cut to this
    # many characters (0: left out), so that they cannot set the tone of the new one
    history_other_persona_chars: int = Field(default=400, ge=0)
    # where the switch markers and other later system notes go: as system messages ("system"),
    # or folded into the next user message ("user"), for a chat template that takes a system
    # message only first
    llm_notes_as: Literal["system", "user"] = "system"

    # the OpenAI-compatible endpoint, for --generator openai
    llm_base_url: str = "http://127.0.0.1:11434/v1"
    llm_api_key: SecretStr | None = None
    llm_model: str = "llama3.2"
    llm_connect_timeout_s: float = Field(default=5.0, gt=0)
    llm_first_token_timeout_s: float = Field(default=60.0, gt=0)
    llm_idle_timeout_s: float = Field(default=30.0, gt=0)
    llm_max_tokens: int = Field(default=512, ge=1)
    # a streamed reply is cut (and fails) past this many characters, whatever the endpoint
    # does with max_tokens: its frame and its history page stay under the 512 KiB a page has
    llm_max_reply_chars: int = Field(default=32_000, ge=1, le=100_000)
    llm_temperature: float = Field(default=0.8, ge=0, le=2)

    @field_validator("llm_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http(s) URL")
        return value

    def secret_path(self) -> Path:
        return self.data_dir / "jwt_secret"

    def pgdata_path(self) -> Path:
        return self.data_dir / "pgdata"


class ConfigError(Exception):
    """A configuration mistake, said in one line that names the setting and how to fix it;
    run.py prints it and exits with status 2."""


# What a valid value looks like, where the field's type does not say it well enough.
EXAMPLES = {
    "port": "a number from 0 to 65535",
    "trusted_proxies": 'a JSON list of addresses or networks, e.g. ["10.0.0.0/8"]',
    "allowed_origins": 'a JSON list of origins, e.g. ["https://chat.example.com"]',
    "llm_base_url": "an http(s) URL, e.g. http://127.0.0.1:11434/v1",
}
NOUNS = {"port": "port", "log_level": "log level", "generator": "generator", "host": "host"}
MAX_SHOWN_CHARS = 60


def env_name(field: str) -> str:
    """The environment variable a setting is read from."""
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
        return alias.choices[0]
    return f"CHAT_{field.upper()}"


def load_settings(flags: Mapping[str, Any] | None = None) -> Settings:
    """The environment's settings overridden by `flags` (setting name to value, as given on
    the command line); ConfigError that names the first invalid one and how to fix it."""
    flags = dict(flags or {})
    try:
        return Settings(**flags)
    except ValidationError as exc:
        errors = exc.errors()
        line = describe_invalid(errors[0], flags)
        others = sorted({str(e["loc"][0]) for e in errors[1:]} - {str(errors[0]["loc"][0])})
        if others:
            line += f" (also not valid: {', '.join(_source(name, flags) for name in others)})"
        raise ConfigError(line) from None
    except SettingsError as exc:  # a list-valued variable that is not JSON
        found = re.search(r'field "(\w+)"', str(exc))
        name = found.group(1) if found else ""
        if name not in Settings.model_fields:
            raise ConfigError(f"a setting cannot be read: {exc}") from None
        env = env_name(name)
        raise ConfigError(f"{env} is not valid: set {env} to {expectation(name)}") from None


def describe_invalid(error: ErrorDetails, flags: Mapping[str, Any]) -> str:
    """`CHAT_PORT=abc is not a valid port: set CHAT_PORT to a number from 0 to 65535`."""
    name = str(error["loc"][0])
    source = _source(name, flags)
    value = flags.get(name, error.get("input"))
    if isinstance(value, list):
        value = " ".join(map(str, value))
    shown = str(value)
    if name == "llm_base_url":  # a user and password in it are not shown
        shown = re.sub(r"//[^/@]*@", "//***@", shown)
    if len(shown) > MAX_SHOWN_CHARS:
        shown = shown[: MAX_SHOWN_CHARS - 3] + "..."
    given = f"{source} {shown}" if source.startswith("--") else f"{source}={shown}"
    noun = NOUNS.get(name)
    what = f"a valid {noun}" if noun else "valid"
    return f"{given} is not {what}: set {source} to {expectation(name)}"


def _source(name: str, flags: Mapping[str, Any]) -> str:
    """Where a setting came from: its flag, if one was given, else its variable."""
    return "--" + name.replace("_", "-") if name in flags else env_name(name)


def expectation(name: str) -> str:
    """What a valid value of the setting `name` looks like, in words."""
    if name in EXAMPLES:
        return EXAMPLES[name]
    field = Settings.model_fields[name]
    kind = field.annotation
    if get_origin(kind) is Literal:
        return "one of " + ", ".join(str(choice) for choice in get_args(kind))
    if kind is bool:
        return "true or false"
    if kind in (int, float):
        return ("a whole number" if kind is int else "a number") + _bounds(field.metadata)
    return "a valid value"


def _bounds(metadata: list[Any]) -> str:
    low: Any = None
    high: Any = None
    low_open = False
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            low = item.ge
        elif isinstance(item, annotated_types.Gt):
            low, low_open = item.gt, True
        elif isinstance(item, annotated_types.Le):
            high = item.le
    if low is not None and high is not None:
        return f" from {low} to {high}"
    if low is not None:
        return f" greater than {low}" if low_open else f" of at least {low}"
    return ""
