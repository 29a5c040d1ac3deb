"""The async Redis client both processes use (redis-py asyncio, hiredis parser): a pooled client
for one Redis, or redis-py's cluster client for Redis Cluster."""

from __future__ import annotations

import asyncio
import codecs
import contextvars
import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import hiredis
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    ConnectionError,
    MasterDownError,
    MaxClientsReachedError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

RedisClient = Redis | RedisCluster
"""What the stores, the log and the worker talk to: either client, the same commands."""

MAX_CONNECTIONS = 64
"""Per process (on a cluster: commands in flight, each on at most one connection per node).
Requests beyond it wait for a free connection instead of failing, so a burst of clients costs
Redis a bounded number of connections."""

POOL_TIMEOUT = 20.0
"""Seconds a command waits for a free connection before it fails as unavailable."""

UNAVAILABLE: tuple[type[Exception], ...] = (
    ConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    TryAgainError,
    SlotNotCoveredError,
)
"""Errors that mean Redis cannot serve right now (down, or a cluster without all its slots):
answered 503 with Retry-After, retried by the worker. Nothing else is."""

REFUSING: tuple[type[Exception], ...] = (
    OutOfMemoryError,
    ReadOnlyError,
    BusyLoadingError,
    MasterDownError,
    MaxClientsReachedError,
)
"""Errors of a Redis that answers but refuses writes for now (maxmemory reached, a read-only
replica after a failover, loading its data set, out of client slots): the API answers them 503
with Retry-After, like UNAVAILABLE."""

NETWORK_ERRORS: tuple[type[Exception], ...] = (*UNAVAILABLE, OSError)
"""What long-lived loops (fan-out, the worker's, the publisher's) retry on: those and raw
socket errors."""

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme in CLUSTER_SCHEMES


RAW_REPLY = "raw_reply"
"""An option of `execute_command` (and of a pipeline's): with ``raw_reply=True`` an XRANGE
returns the reply as hiredis parsed it, ``[[id, [field, value, ...]], ...]``, not redis-py's
tuples of dicts, which cost a long history read more than the read itself."""


def connect(url: str, *, cluster: bool = False, max_connections: int = MAX_CONNECTIONS
) -> RedisClient:  # fmt: skip
    """A pooled client for `url`; replies stay bytes so wire payloads are never re-decoded.

    ``redis+cluster://host:port[,host:port...]`` (``rediss+cluster://`` for TLS), or any URL
    with `cluster`, gives the cluster client, which finds the other nodes by itself.
    """
    if cluster or is_cluster_url(url):
        client: RedisClient = _connect_cluster(url, max_connections)
    else:
        # TCP keepalive only where there is TCP: a Unix socket's connection takes no such option.
        tcp = {} if urlsplit(url).scheme == "unix" else {"socket_keepalive": True}
        pool = BoundedPool.from_url(
            url,
            max_connections=max_connections,
            health_check_interval=15,
            retry_on_timeout=True,
            socket_connect_timeout=5,
            **tcp,
        )
        client = Redis.from_pool(pool)
    _allow_raw(client, "XRANGE")
    return client


def _allow_raw(client: RedisClient, command: str) -> None:
    """Let `command` be asked for with `RAW_REPLY` (redis-py's own parsing otherwise)."""
    parse = client.response_callbacks.get(command)

    def callback(response: Any, raw_reply: bool = False, **options: Any) -> Any:
        if raw_reply or parse is None:
            return response
        return parse(response, **options)

    client.set_response_callback(command, callback)


class BoundedPool(ConnectionPool):
    """redis-py's pool, holding at most `max_connections`; a command beyond them waits its turn
    (first come, first served) for up to `POOL_TIMEOUT`, then fails as unavailable.

    Not redis-py's BlockingConnectionPool: every checkout and return there goes through one
    asyncio.Condition, so under a burst (a thousand clients reconnecting at once) each return
    queues behind every waiting checkout for the condition's lock, one event-loop turn per
    hand-off, and commands wait seconds for connections that sit idle. A semaphore hands a
    returned connection to the next waiter in one step, and costs nothing while one is free.
    """

    def __init__(self, *args: Any, max_connections: int = MAX_CONNECTIONS, **kwargs: Any) -> None:
        # The semaphore is the bound. redis-py's own count is not: its `get_connection`, cut
        # short between taking a connection and its `try`, leaves that connection counted in
        # use forever, and enough of those would refuse every command ("Too many connections").
        kwargs["max_connections"] = 2**31 - 1
        super().__init__(*args, **kwargs)
        encoding = self.connection_kwargs.get("encoding", "utf-8")
        if codecs.lookup(encoding).name == "utf-8":
            self.connection_class = _packed_by_hiredis(self.connection_class)  # type: ignore[arg-type]
        self._permits = asyncio.Semaphore(max_connections)
        self._holding: set[AbstractConnection] = set()
        """Connections handed out, each holding one permit (given back once, on release)."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        if self._permits.locked():
            try:
                async with asyncio.timeout(POOL_TIMEOUT):
                    await self._permits.acquire()
            except TimeoutError:
                raise ConnectionError("No connection available.") from None
        else:
            await self._permits.acquire()  # free: returns at once
        try:
            connection: AbstractConnection = await super().get_connection()  # type: ignore[no-untyped-call]
        except BaseException:
            # (redis-py has released the connection itself, through `release` below, which
            # gives back no permit for a connection it never handed out.)
            self._permits.release()
            raise
        self._holding.add(connection)
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        try:
            await super().release(connection)
        finally:
            if connection in self._holding:
                self._holding.discard(connection)
                self._permits.release()


class _HiredisPacking:
    """Packs a command in one call to hiredis when it can, as redis-py itself does once it has
    turned each argument into bytes: a Python step per argument that cost more than the
    packing (about 0.2 µs each), and a worker's append call names five keys per run (a flush
    of a paced load writes a token or two for each of dozens of runs).

    hiredis takes str (as UTF-8, redis-py's default encoding: a pool told another one packs
    redis-py's way), bytes, int and float, each as redis-py would write it, and refuses
    anything else (bool, None, bytearray) with a TypeError: those, and a command name holding
    a space ("CONFIG GET"), go redis-py's way, which encodes or refuses them as it always has."""

    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0]
        if type(name) is str and " " not in name:
            try:
                return [hiredis.pack_command(args)]
            except TypeError:
                pass
        return super().pack_command(*args)  # type: ignore[misc, no-any-return]


@functools.cache
def _packed_by_hiredis(connection_class: type[Any]) -> type[Any]:
    """`connection_class` (plain, TLS or Unix socket, as the URL says) packing with
    `_HiredisPacking`."""
    return type(connection_class.__name__, (_HiredisPacking, connection_class), {})


def _connect_cluster(url: str, max_connections: int) -> RedisCluster:
    parts = urlsplit(url)
    scheme = CLUSTER_SCHEMES.get(parts.scheme, parts.scheme)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    nodes = [h.strip() for h in hosts.split(",") if h.strip()]
    if not nodes:
        raise ValueError(f"no host in the Redis URL {url!r}")
    first = f"{userinfo}@{nodes[0]}" if userinfo else nodes[0]
    # redis-py parses one node's URL (credentials, TLS, options); the rest are more seeds.
    seed = urlunsplit((scheme, first, parts.path, parts.query, ""))
    others = [_node(h) for h in nodes[1:]]
    return BoundedCluster.from_url(
        seed,
        startup_nodes=others,
        max_connections=max_connections,
        health_check_interval=15,
        socket_keepalive=True,
        socket_connect_timeout=5,
    )


_holding_permit = contextvars.ContextVar("holding_permit", default=False)


class BoundedCluster(RedisCluster):
    """redis-py's cluster client with the manners of the standalone pool: at most
    `max_connections` commands or pipelines in flight per process, the rest wait their turn.

    redis-py's own per-node limit fails at once instead (MaxConnectionsError), and a pipeline
    that fails so makes redis-py close the whole client, breaking every command in flight. With
    one permit per command or pipeline, and each using at most one connection per node, no node
    ever reaches its limit. It also loads the slot map before the first command, which redis-py
    (8.1) does not do safely when many first commands start at once.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("max_connections", MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)
        self._permits = asyncio.Semaphore(kwargs["max_connections"])

    @asynccontextmanager
    async def permit(self) -> AsyncIterator[None]:
        if _holding_permit.get():  # a pipeline retrying one of its commands: already counted
            yield
            return
        try:
            async with asyncio.timeout(POOL_TIMEOUT):
                await self._permits.acquire()
        except TimeoutError:
            raise ConnectionError("No connection available.") from None
        token = _holding_permit.set(True)
        try:
            yield
        finally:
            _holding_permit.reset(token)
            self._permits.release()

    async def initialize(self, *args: Any, **kwargs: Any) -> BoundedCluster:
        try:
            await super().initialize(*args, **kwargs)
        except SlotNotCoveredError:
            raise
        except RedisClusterException as exc:
            # No node answered (redis-py says so with its own exception): Redis is unavailable,
            # as when a single Redis refuses the connection, and callers retry the same way.
            raise ConnectionError(f"Redis Cluster unavailable: {exc}") from exc
        return self

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.permit():
            # Load the slot map first: redis-py would route the first commands through a seed
            # node whose connections the map's arrival then recycles under them.
            await self.initialize()
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None
    ) -> ClusterPipeline:  # fmt: skip
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        # redis-py builds its ClusterPipeline the same way; its typing wrongly calls the
        # dispatcher attribute that __init__ sets abstract.
        return _BoundedPipeline(self, transaction)  # type: ignore[abstract]


class _BoundedPipeline(ClusterPipeline):
    cluster_client: BoundedCluster

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[Any]:  # fmt: skip
        async with self.cluster_client.permit():
            await self.cluster_client.initialize()
            return await super().execute(raise_on_error, allow_redirections)


def _node(host_port: str) -> ClusterNode:
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"a cluster node must be host:port, not {host_port!r}")
    return ClusterNode(host.strip("[]"), int(port))


def in_order(redis: RedisClient) -> bool:
    """Whether the commands of one pipeline on `redis` take effect in the order they were
    queued: on one server they do; a cluster sends each node its share at once, so a write
    that must be seen before another (a hash before the list that names it) goes first in a
    round trip of its own."""
    return not isinstance(redis, RedisCluster)


async def ready(redis: RedisClient, probe_key: str | None = None) -> None:
    """Raise unless Redis can serve: it answers PING, a cluster covers all its slots, and a
    write to `probe_key` (when given) is accepted (not refused for memory, a failed save or a
    read-only replica)."""
    if isinstance(redis, RedisCluster):
        await redis.ping(target_nodes=RedisCluster.ALL_NODES)
        info = await redis.cluster_info()
        state = info.get("cluster_state")
        if state != "ok":
            raise RedisError(f"cluster_state is {state}")
    else:
        await redis.ping()
    if probe_key is not None:
        await redis.set(probe_key, b"1", ex=10)
