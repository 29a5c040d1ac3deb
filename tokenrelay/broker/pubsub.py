"""Pub/sub on one Redis and on Redis Cluster, behind the interface of redis-py's PubSub.

One Redis: PUBLISH and SUBSCRIBE through redis-py as they are (Redis 6.2 works). A cluster:
sharded pub/sub (SPUBLISH, SSUBSCRIBE; Redis 7): a channel lives on the node that owns its hash
slot, so a run's live channel sits beside the run's keys, the append script publishes to it as
one of its keys, and no message is broadcast over the cluster bus to every node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable
from typing import Any, Protocol

from redis.asyncio import ConnectionPool
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError, SlotNotCoveredError

from tokenrelay.broker.connection import NETWORK_ERRORS, RedisClient
from tokenrelay.broker.runtime import cancel_and_wait
from tokenrelay.broker.scripts import AnyPipeline

try:
    from redis._parsers.hiredis import NOT_ENOUGH_DATA
except ImportError:  # pragma: no cover - another redis-py layout: every read takes its own path
    NOT_ENOUGH_DATA = None

log = logging.getLogger("tokenrelay.pubsub")

Channel = str | bytes


class Subscriber(Protocol):
    """What fan-out and the worker's control channel use; redis-py's PubSub is one."""

    @property
    def subscribed(self) -> bool: ...

    def subscribe(self, *channels: Channel) -> Awaitable[Any]: ...

    def unsubscribe(self, *channels: Channel) -> Awaitable[Any]: ...

    def get_message(
        self, ignore_subscribe_messages: bool = False, timeout: float | None = 0.0
    ) -> Awaitable[dict[str, Any] | None]:
        """The next message, or None after `timeout`; raises when the connection is lost."""

    def aclose(self) -> Awaitable[None]: ...


def subscriber(redis: RedisClient, *, ignore_subscribe_messages: bool = False) -> Subscriber:
    """A subscriber on `redis`: sharded on a cluster, plain otherwise."""
    if isinstance(redis, RedisCluster):
        return ShardedSubscriber(redis, ignore_subscribe_messages=ignore_subscribe_messages)
    return BufferedPubSub(
        redis.connection_pool,
        ignore_subscribe_messages=ignore_subscribe_messages,
        event_dispatcher=getattr(redis, "_event_dispatcher", None),
    )


class BufferedPubSub(PubSub):
    """redis-py's PubSub, except that a message already received is handed out at once.

    Redis writes the messages of a burst together, and redis-py reads each one through several
    layers of coroutines (retry, timeout, push handling and logging): about 10 µs per message,
    more than fan-out then spends on it. A message already in the parser's buffer is taken from
    it directly and goes through the same checks; anything unusual takes redis-py's own path.
    """

    buffered_reads = 0
    """Messages read from the buffer (tests check that this path is taken)."""

    async def get_message(
        self, ignore_subscribe_messages: bool = False, timeout: float | None = 0.0
    ) -> dict[str, Any] | None:
        response = self._buffered()
        if response is NOT_ENOUGH_DATA:
            return await super().get_message(ignore_subscribe_messages, timeout)  # type: ignore[no-any-return]
        self.buffered_reads += 1
        parser: Any = getattr(self.connection, "_parser", None)
        push = parser._hiredis_PushNotificationType
        if push is not None and isinstance(response, push):
            if (
                len(response) == 3
                and response[0] == b"message"
                and self.channels.get(response[1]) is None
            ):
                return {"type": "message", "pattern": None, "channel": response[1],
                        "data": response[2]}  # fmt: skip
            response = await parser.handle_push_response(response)
        elif isinstance(response, Exception):
            raise response  # as redis-py's parser and connection do
        elif (
            isinstance(response, list)
            and response
            and isinstance(response[0], RedisConnectionError)
        ):
            raise response[0]
        if not response:
            return None
        checks = getattr(self.connection, "health_check_interval", 0)
        if checks and response in self.health_check_response:
            return None  # the answer to redis-py's health-check PING, as redis-py drops it
        message = await self.handle_message(response, ignore_subscribe_messages)  # type: ignore[no-untyped-call]
        return message  # type: ignore[no-any-return]

    def _buffered(self) -> Any:
        """The next reply already received, or NOT_ENOUGH_DATA (also whenever this redis-py
        does not look as expected: then redis-py reads). Health checks are sent when nothing
        is buffered, by redis-py's own read."""
        conn = self.connection
        if conn is None or NOT_ENOUGH_DATA is None:
            return NOT_ENOUGH_DATA
        parser = getattr(conn, "_parser", None)
        reader = getattr(parser, "_reader", None)
        if (
            reader is None
            or not getattr(parser, "_connected", False)
            or not hasattr(parser, "_hiredis_PushNotificationType")
            or not reader.has_data()
        ):
            return NOT_ENOUGH_DATA
        return reader.gets()


async def publish(redis: RedisClient, channel: Channel, message: bytes) -> None:
    if isinstance(redis, RedisCluster):
        await redis.spublish(channel, message)
    else:
        await redis.publish(channel, message)


def publish_in(pipe: AnyPipeline, redis: RedisClient, channel: Channel, message: bytes) -> None:
    """Queue `publish` on `pipe`, a pipeline of `redis`."""
    if isinstance(redis, RedisCluster):
        pipe.spublish(channel, message)
    else:
        pipe.publish(channel, message)


def publish_command(redis: RedisClient) -> str:
    """The command a script publishes with on `redis`."""
    return "SPUBLISH" if isinstance(redis, RedisCluster) else "PUBLISH"


def _name(channel: Channel) -> bytes:
    return channel if isinstance(channel, bytes) else channel.encode()


class _NodePubSub(PubSub):
    """A plain PubSub on one node that resubscribes one channel at a time after a reconnect:
    one SSUBSCRIBE may only name channels of one slot."""

    async def on_connect(self, connection: Any) -> None:
        self.pending_unsubscribe_shard_channels.clear()
        for channel in list(self.shard_channels):
            await self.ssubscribe(channel)


class _NodeFeed:
    """The connection to one node and the task reading it."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node
        self.pool = ConnectionPool(connection_class=node.connection_class, **node.connection_kwargs)
        self.pubsub = _NodePubSub(self.pool)
        self.unsubscribing: Counter[bytes] = Counter()
        """Channels we asked to leave, whose `sunsubscribe` has not come back yet."""
        self.lost = False
        self.task: asyncio.Task[None] | None = None

    async def close(self) -> None:
        await _cancel(self.task)
        with contextlib.suppress(*NETWORK_ERRORS):
            await self.pubsub.aclose()  # type: ignore[no-untyped-call]
        await self.pool.aclose()


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        await cancel_and_wait(task)


class ShardedSubscriber:
    """SSUBSCRIBE on a Redis Cluster: one plain connection per node that owns a subscribed
    channel, each read by its own task, so a quiet node never delays another's messages.

    It follows its channels: when a slot moves to another node (Redis then sends `sunsubscribe`),
    a subscription lands on a node that no longer owns the slot (MOVED) or a node is lost, it
    refreshes the slot map and subscribes again where each channel lives now. As with PubSub,
    every (re)subscription is confirmed by a `subscribe` message and a lost connection raises
    from `get_message`, which tells readers to catch up from the streams.
    """

    def __init__(self, cluster: RedisCluster, *, ignore_subscribe_messages: bool = False) -> None:
        self._cluster = cluster
        self._ignore = ignore_subscribe_messages
        self._owner: dict[bytes, str] = {}
        """Each subscribed channel and the node it was subscribed on."""
        self._feeds: dict[str, _NodeFeed] = {}
        self._inbox: asyncio.Queue[dict[str, Any] | Exception] = asyncio.Queue()
        self._lock = asyncio.Lock()
        self._stale = asyncio.Event()
        self._follower: asyncio.Task[None] | None = None

    @property
    def subscribed(self) -> bool:
        return bool(self._owner)

    async def subscribe(self, *channels: Channel) -> None:
        async with self._lock:
            await self._cluster.initialize()  # loads the slot map on first use
            for channel in map(_name, channels):
                await self._subscribe_on(self._node_of(channel), channel)

    async def unsubscribe(self, *channels: Channel) -> None:
        async with self._lock:
            for channel in map(_name, channels):
                feed = self._feeds.get(self._owner.pop(channel, ""))
                if feed is not None and channel in feed.pubsub.shard_channels:
                    feed.unsubscribing[channel] += 1
                    await feed.pubsub.sunsubscribe(channel)

    async def get_message(
        self, ignore_subscribe_messages: bool = False, timeout: float | None = 0.0
    ) -> dict[str, Any] | None:
        try:
            if timeout == 0:
                item = self._inbox.get_nowait()
            else:
                # Not asyncio.wait_for: on Python 3.11 it can swallow a cancellation that
                # coincides with an item arriving, and the reader would never stop.
                async with asyncio.timeout(timeout):
                    item = await self._inbox.get()
        except (asyncio.QueueEmpty, TimeoutError):
            return None
        if isinstance(item, Exception):
            raise item
        if item["type"] != "message" and (ignore_subscribe_messages or self._ignore):
            return None
        return item

    async def aclose(self) -> None:
        await _cancel(self._follower)
        self._follower = None
        async with self._lock:
            feeds = list(self._feeds.values())
            self._feeds.clear()
            self._owner.clear()
        for feed in feeds:
            await feed.close()

    def _node_of(self, channel: bytes) -> ClusterNode:
        node = self._cluster.get_node_from_key(channel)  # type: ignore[arg-type]
        if node is None:
            raise SlotNotCoveredError(f"no node serves the slot of {channel!r}")
        return node

    async def _subscribe_on(self, node: ClusterNode, channel: bytes) -> None:
        """SSUBSCRIBE `channel` on `node` (under the lock); raises if the node cannot be reached."""
        feed = self._feeds.get(node.name)
        if feed is None:
            feed = self._feeds[node.name] = _NodeFeed(node)
        await feed.pubsub.ssubscribe(channel)
        self._owner[channel] = node.name
        if feed.task is None:
            feed.task = asyncio.create_task(self._read(feed), name=f"ssubscribe-{node.name}")
        if self._follower is None:
            self._follower = asyncio.create_task(self._follow_loop(), name="ssubscribe-follow")

    async def _read(self, feed: _NodeFeed) -> None:
        backoff = 0.1
        while True:
            try:
                msg = await feed.pubsub.get_message(timeout=5.0)
            except NETWORK_ERRORS as exc:
                # The connection retries (and resubscribes) on the next read; meanwhile the
                # slot map may show that the channels live elsewhere now.
                if not feed.lost:
                    log.warning("sharded pub/sub connection to %s lost: %s", feed.node.name, exc)
                    feed.lost = True
                    self._inbox.put_nowait(exc)  # readers catch up from the streams
                self._stale.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            except RedisError as exc:  # MOVED or CLUSTERDOWN for a subscription: map out of date
                log.warning("sharded subscription on %s refused: %s", feed.node.name, exc)
                self._stale.set()
                continue
            feed.lost = False
            backoff = 0.1
            if msg is None:
                continue
            kind = msg["type"]
            if kind == "smessage":
                self._inbox.put_nowait({**msg, "type": "message"})
            elif kind == "ssubscribe":
                self._inbox.put_nowait({**msg, "type": "subscribe"})
            elif kind == "sunsubscribe":
                channel = msg["channel"]
                if feed.unsubscribing[channel] > 0:
                    feed.unsubscribing[channel] -= 1
                    if not feed.unsubscribing[channel]:
                        del feed.unsubscribing[channel]
                    self._inbox.put_nowait({**msg, "type": "unsubscribe"})
                else:  # not asked for: its slot moved to another node
                    feed.pubsub.shard_channels.pop(channel, None)
                    self._stale.set()

    async def _follow_loop(self) -> None:
        backoff = 0.1
        while True:
            await self._stale.wait()
            self._stale.clear()
            if await self._follow():
                backoff = 0.1
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                self._stale.set()

    async def _follow(self) -> bool:
        """Subscribe every channel on the node that owns its slot now; False if some could not
        be (the slot is not served, or its node cannot be reached yet)."""
        async with self._lock:
            try:
                await self._cluster.nodes_manager.initialize()
            except (RedisError, RedisClusterException) as exc:
                log.warning("cannot refresh the cluster's slot map: %s", exc)
                return False
            done = True
            for channel, name in list(self._owner.items()):
                try:
                    node = self._node_of(channel)
                except RedisClusterException:
                    done = False  # the slot is not served at the moment
                    continue
                feed = self._feeds.get(name)
                if node.name == name and feed is not None and channel in feed.pubsub.shard_channels:
                    continue  # still there; a lost connection resubscribes when it is back
                if feed is not None:
                    feed.pubsub.shard_channels.pop(channel, None)
                try:
                    await self._subscribe_on(node, channel)
                except NETWORK_ERRORS as exc:
                    log.warning("cannot subscribe on %s yet: %s", node.name, exc)
                    done = False
            # Close the connections of nodes that lost every channel they served.
            for name, feed in list(self._feeds.items()):
                if feed.lost and not feed.pubsub.shard_channels:
                    del self._feeds[name]
                    await feed.close()
            return done
