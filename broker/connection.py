"""The async Redis client both processes use (redis-py asyncio, hiredis parser)."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis

MAX_CONNECTIONS = 64
"""Per process. Requests beyond it wait for a free connection instead of failing, so a burst of
clients costs Redis a bounded number of connections."""


def connect(url: str, *, max_connections: int = MAX_CONNECTIONS) -> Redis:
    """A pooled client for `url`; replies stay bytes so wire payloads are never re-decoded."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=20,
        health_check_interval=15,
        socket_keepalive=True,
        retry_on_timeout=True,
        socket_connect_timeout=5,
    )
    return Redis.from_pool(pool)
