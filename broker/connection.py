"""The async Redis client both processes use (redis-py asyncio, hiredis parser)."""

from __future__ import annotations

from redis.asyncio import Redis


def connect(url: str) -> Redis:
    """A pooled client for `url`; replies stay bytes so wire payloads are never re-decoded."""
    return Redis.from_url(
        url,
        decode_responses=False,
        health_check_interval=15,
        socket_keepalive=True,
        retry_on_timeout=True,
    )
