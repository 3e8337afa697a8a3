"""The one settings object: environment (`CHAT_*`, `DATABASE_URL`), overridden by run.py flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, IPvAnyNetwork, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    history_bytes_per_s: int = Field(default=256 * 1024, ge=1024)
    history_burst_bytes: int = Field(default=2 * 1024 * 1024, ge=64 * 1024)
    ping_interval_s: float = Field(default=20.0, gt=0)
    ping_timeout_s: float = Field(default=20.0, gt=0)
    send_timeout_s: float = Field(default=10.0, gt=0)
    outbox_limit_bytes: int = Field(default=1024 * 1024, ge=64 * 1024)
    drain_timeout_s: float = Field(default=10.0, gt=0)

    # browsers: origins allowed besides the server's own (same-origin is always allowed)
    allowed_origins: list[str] = Field(default_factory=list)

    # replies
    generator: Literal["template", "openai"] = "template"
    template_delay_ms: float = Field(default=0.0, ge=0)
    history_turns: int = Field(default=6, ge=0)
    history_chars: int = Field(default=8000, ge=0)
    delta_flush_ms: float = Field(default=20.0, ge=0)
    delta_flush_chars: int = Field(default=64, ge=1)

    # the OpenAI-compatible endpoint, for --generator openai
    llm_base_url: str = "http://127.0.0.1:11434/v1"
    llm_api_key: SecretStr | None = None
    llm_model: str = "llama3.2"
    llm_connect_timeout_s: float = Field(default=5.0, gt=0)
    llm_first_token_timeout_s: float = Field(default=60.0, gt=0)
    llm_idle_timeout_s: float = Field(default=30.0, gt=0)
    llm_max_tokens: int = Field(default=512, ge=1)
    llm_temperature: float = Field(default=0.8, ge=0, le=2)

    def secret_path(self) -> Path:
        return self.data_dir / "jwt_secret"

    def pgdata_path(self) -> Path:
        return self.data_dir / "pgdata"
