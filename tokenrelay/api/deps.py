"""What a request handler needs, built once per process in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from starlette.requests import HTTPConnection

from tokenrelay.api.fanout import Fanout
from tokenrelay.api.sse import Draining
from tokenrelay.broker.cancel import CancelSignal
from tokenrelay.broker.connection import RedisClient
from tokenrelay.broker.graphs import GraphRegistry
from tokenrelay.broker.keys import Keys
from tokenrelay.broker.log import EventLog
from tokenrelay.broker.queue import RunQueue
from tokenrelay.broker.runs import RunStore
from tokenrelay.broker.settings import Settings
from tokenrelay.broker.state import ThreadStates
from tokenrelay.broker.threads import ThreadStore


@dataclass(slots=True)
class Services:
    settings: Settings
    redis: RedisClient
    keys: Keys
    log: EventLog
    runs: RunStore
    threads: ThreadStore
    queue: RunQueue
    fanout: Fanout
    registry: GraphRegistry
    states: ThreadStates
    cancel: CancelSignal
    draining: Draining
    """Set when the process is shutting down: live streams abort so clients resume elsewhere."""

    @classmethod
    def build(cls, settings: Settings, redis: RedisClient, registry: GraphRegistry) -> Services:
        keys = Keys(settings.key_prefix)
        return cls(
            settings=settings,
            redis=redis,
            keys=keys,
            log=EventLog(
                redis, keys, maxlen=settings.stream_maxlen, ttl_seconds=settings.retention_seconds
            ),
            runs=RunStore(redis, keys, ttl_seconds=settings.retention_seconds),
            threads=ThreadStore(redis, keys),
            queue=RunQueue(redis, keys),
            fanout=Fanout(redis, keys),
            registry=registry,
            states=ThreadStates(registry),
            cancel=CancelSignal(redis, keys, ttl_seconds=settings.cancel_ttl_seconds),
            draining=Draining(),
        )


def services_of(conn: HTTPConnection) -> Services:
    """The process's `Services`, for a request or WebSocket."""
    svc: Services = conn.app.state.services
    return svc


async def services(request: Request) -> Services:
    """The dependency: async, so FastAPI calls it in the event loop rather than sending it to
    its thread pool (a thread hop per request costs more than everything it does)."""
    return services_of(request)
