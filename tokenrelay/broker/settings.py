"""Settings read from the environment (prefix ``TOKENRELAY_``); every one has a working default."""

from __future__ import annotations

import resource
from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_GRAPHS = {"agent": "tokenrelay.producer.demo:graph"}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOKENRELAY_", extra="ignore")

    redis_url: str | None = Field(
        default=None,
        description="redis://, rediss://, unix:///path, or "
        "redis+cluster://host:port[,host:port...] (rediss+cluster:// for TLS); "
        "`tokenrelay dev` embeds one when unset.",
    )
    redis_cluster: bool = Field(
        default=False,
        description="Use the Redis Cluster client with a plain redis:// or rediss:// URL.",
    )
    graphs: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_GRAPHS))
    checkpointer: str = "memory"
    key_prefix: str = "tr"

    retention_seconds: int = Field(default=3600, ge=1)
    stream_maxlen: int = Field(default=100_000, ge=10)
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    stream_max_seconds: float = Field(default=0.0, ge=0, description="0 means no budget.")
    flush_ms: float = Field(default=2.0, ge=0)
    flush_max_events: int = Field(
        default=256,
        ge=1,
        description="A worker writes as soon as this many events are buffered, and one append "
        "(so one live batch) carries at most this many of one run's.",
    )
    lease_seconds: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    cancel_ttl_seconds: int = Field(default=3600, ge=1)
    worker_concurrency: int = Field(default=500, ge=1)
    shutdown_grace_seconds: float = Field(default=30.0, ge=0)

    api_keys: list[str] = Field(default_factory=list)
    auth: str | None = Field(
        default=None,
        description="A `langgraph_sdk.Auth` object ('./auth.py:auth' or 'module:attr'), as "
        "langgraph.json's auth.path; it authenticates every request and scopes every thread.",
    )
    http_app: str | None = Field(
        default=None,
        description="A Starlette/FastAPI app mounted beside the API, as langgraph.json's http.app.",
    )
    http_app_auth: bool = Field(
        default=False,
        description="Authenticate the routes of http.app too (langgraph.json's "
        "http.enable_custom_route_auth); by default only the API's own routes are.",
    )
    stream_token_secret: str | None = Field(
        default=None,
        description="HMAC secret of stream tokens; the same on every API replica. Unset: "
        "one random secret per `tokenrelay api`/`dev` command.",
    )
    stream_token_ttl_seconds: int = Field(default=300, ge=1, le=86_400)
    cors_origins: list[str] = Field(default_factory=list)

    # Limits (docs/security.md): every one answers clearly past it and has a working default.
    max_body_bytes: int = Field(
        default=10 * 1024 * 1024, ge=1024, description="Largest request body (413 past it)."
    )
    max_json_depth: int = Field(
        default=64, ge=2, description="Deepest nesting of a JSON request body (422 past it)."
    )
    max_open_connections: int = Field(
        default=0,
        ge=0,
        description="Open HTTP connections per API process; past it, requests other than the "
        "probes are answered 503 with Retry-After and the connection is closed. 0: the "
        "process's file-descriptor limit less 128 (Redis, Postgres, files), at least 64.",
    )
    max_open_streams: int = Field(
        default=2000,
        ge=1,
        description="Open streams (SSE, long-poll, wait, WebSocket) per API process; 503 with "
        "Retry-After past it.",
    )
    header_timeout_seconds: float = Field(
        default=10.0, gt=0, description="Time a client has to send a request's headers."
    )
    keepalive_timeout_seconds: int = Field(
        default=5, ge=1, description="Idle time before a keep-alive connection is closed."
    )
    rate_limit_per_minute: int = Field(
        default=0,
        ge=0,
        description="Requests per minute per client (API key, else client address) per API "
        "process, 429 with Retry-After past it; 0 turns it off.",
    )
    rate_limit_burst: int = Field(
        default=0, ge=0, description="Requests a client may burst above the rate (0: a tenth)."
    )

    demo_reply_words: int = Field(default=200, ge=0)
    demo_token_delay_ms: float = Field(default=20.0, ge=0)

    def connections_cap(self) -> int:
        """`max_open_connections`, or what the file-descriptor limit leaves for clients."""
        if self.max_open_connections:
            return self.max_open_connections
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return 65_536
        return max(64, soft - 128)

    def resolved_redis_url(self) -> str:
        """The configured Redis URL, or the local default for `api`/`worker`."""
        return self.redis_url or "redis://127.0.0.1:6379/0"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read once."""
    return Settings()
