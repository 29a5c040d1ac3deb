"""Live fan-out: one pub/sub connection per API process, one subscription per run, shared by all
of that run's clients through reference counting.

Clients join and leave a channel synchronously (no await, so no cancellation can cut it
short); one task, the syncer, brings the Redis subscriptions in line with the channels that
have clients, or had one less than `LINGER_SECONDS` ago. No lock is held across a round trip
to Redis, and a client that hangs up at any point, however its task is cancelled, leaves
nothing subscribed behind once the channel has lingered.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable

from tokenrelay.broker import telemetry
from tokenrelay.broker.connection import NETWORK_ERRORS, RedisClient
from tokenrelay.broker.keys import Keys
from tokenrelay.broker.log import LiveBatch
from tokenrelay.broker.models import StreamId
from tokenrelay.broker.pubsub import Subscriber, subscriber
from tokenrelay.broker.retry import Backoff
from tokenrelay.broker.runtime import cancel_and_wait

log = logging.getLogger("tokenrelay.fanout")


LINGER_SECONDS = 2.0
"""How long a channel stays subscribed after its last client left. A client that comes back
(a page refresh, a proxy's or a platform's time limit, a reconnect storm) finds the channel
live, so its lookup reads its first page too (`live_epoch`), and a channel is not unsubscribed
and subscribed again as clients come and go."""

_queued_entries = [0]
"""Live entries queued in this process's subscriptions, counted as plain ints (a batch is
queued and taken once per token per reader) and read by the gauge when it is scraped."""
telemetry.LIVE_QUEUED_ENTRIES.set_function(lambda: _queued_entries[0])

_offering = [True]
"""Whether waiting readers are offered live batches (`Subscription.push`): off for the rest of
the process after an offer failed, since what failed once (a server whose internals changed,
say) would fail, and be logged, at every batch."""


class Subscription:
    """One client's view of a run's live feed: a queue bounded by its number of entries.

    Past the bound the queue is dropped and the client is told to catch up from the stream, so a
    slow client costs at most `limit` entries of memory, however fast the run produces.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._queued = 0
        self._queue: deque[LiveBatch] = deque()
        self._overflowed = False
        self._waiter: asyncio.Future[None] | None = None
        # The idle timeout of `get`: one timer per idle period, not one per batch. A wait only
        # moves the deadline; the timer, when it fires early, is set again for the deadline.
        self._idle_at = 0.0
        self._timeout = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._direct: Callable[[LiveBatch], bool] | None = None
        """What `get` offers a batch while it waits with nothing queued (see `push`)."""
        self.joined: tuple[int, StreamId | None] = (0, None)
        """The channel's epoch and the last entry it had delivered when this client joined
        (see `Fanout.live_epoch`)."""

    @property
    def overflowed(self) -> bool:
        return self._overflowed

    def queued_after(self, position: StreamId) -> bool:
        """Whether a queued batch holds an entry after `position`: a tail at `position` gets
        something new without waiting (batches it already has are skipped)."""
        queue = self._queue
        return bool(queue) and bool(queue[-1].entries) and queue[-1].entries[-1].id > position

    def push(self, batch: LiveBatch) -> None:
        if self._overflowed:
            return
        direct = self._direct
        if direct is not None and _offering[0]:
            # The reader waits with nothing queued: it may take the batch here and now (write
            # it to its client), not woken for it. Once one is refused, the rest queue behind
            # it until the reader has taken them, so order holds.
            try:
                taken = direct(batch)
            except Exception:  # a bug must not stop the fan-out: readers take batches themselves
                log.exception("offering live batches to waiting readers failed; stopped offering")
                _offering[0] = False
                taken = False
            if taken:
                self._idle_at = asyncio.get_running_loop().time() + self._timeout
                return
            self._direct = None
        if self._queued + len(batch.entries) > self._limit:
            self._drop()
            self._overflowed = True
            telemetry.SLOW_CLIENT_FALLBACKS.inc()
        else:
            self._queue.append(batch)
            self._queued += len(batch.entries)
            _queued_entries[0] += len(batch.entries)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _drop(self) -> None:
        _queued_entries[0] -= self._queued
        self._queue.clear()
        self._queued = 0

    def mark_overflowed(self) -> None:
        self._drop()
        self._overflowed = True
        self._wake()

    def reset(self) -> None:
        self._drop()
        self._overflowed = False
        self._direct = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def get(
        self, timeout: float, direct: Callable[[LiveBatch], bool] | None = None
    ) -> LiveBatch | None:
        """The next batch, or None after `timeout` seconds without one; while it waits, batches
        are offered to `direct` first (see `tokenrelay.broker.log.LiveSubscription`)."""
        if not self._queue:
            loop = asyncio.get_running_loop()
            self._idle_at = loop.time() + timeout
            self._timeout = timeout
            if self._timer is not None and self._timer.when() > self._idle_at:
                self._timer.cancel()
                self._timer = None
            if self._timer is None:
                self._timer = loop.call_at(self._idle_at, self._idle, loop)
            # A bare future, not an Event and a timeout: this wait happens once per batch.
            self._waiter = loop.create_future()
            self._direct = direct
            try:
                await self._waiter
            finally:
                self._waiter = None
                self._direct = None
            if not self._queue:
                return None
        batch = self._queue.popleft()
        self._queued -= len(batch.entries)
        _queued_entries[0] -= len(batch.entries)
        return batch

    def _idle(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if self._waiter is None:
            return  # nobody waits: the next wait sets the timer again
        if loop.time() >= self._idle_at - 0.001:  # the loop's clock may count whole ms
            self._wake()
        else:
            self._timer = loop.call_at(self._idle_at, self._idle, loop)


class _Channel:
    def __init__(self, epoch: int) -> None:
        self.subscribers: set[Subscription] = set()
        self.confirmed = asyncio.Event()
        self.epoch = epoch
        """Changes whenever the channel may have missed a batch (a new subscribe, a lost
        connection): between two equal readings it delivered every batch published."""
        self.last: StreamId | None = None
        """The newest entry of the batches it delivered."""
        self.idle_since: float | None = None
        """When its last client left (it lingers), else None."""


class Fanout:
    """Shares one Redis pub/sub connection among every live reader of this process."""

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        *,
        queue_limit: int = 2048,
        linger: float = LINGER_SECONDS,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._limit = queue_limit
        self._linger = linger
        self._channels: dict[bytes, _Channel] = {}
        """Channels with a client, or lingering after their last one: what should be
        subscribed."""
        self._active: set[bytes] = set()
        """Channels subscribed on Redis (or being subscribed), as the syncer last left them."""
        self._pubsub: Subscriber | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._closing = False
        self._epochs = itertools.count(1)

    @property
    def channel_count(self) -> int:
        """Channels subscribed (or being subscribed), lingering ones included."""
        return len(self._channels)

    @property
    def client_count(self) -> int:
        """Subscriptions held by clients."""
        return sum(len(channel.subscribers) for channel in self._channels.values())

    async def start(self) -> None:
        self._pubsub = subscriber(self._redis)
        self._tasks = [
            asyncio.create_task(self._reader(), name="fanout"),
            asyncio.create_task(self._syncer(), name="fanout-sync"),
        ]

    async def stop(self) -> None:
        self._closing = True
        self._changed.set()  # the syncer ends at its next turn, even if a cancel is swallowed
        for task in self._tasks:
            await cancel_and_wait(task)  # the reader has no turn to end at: cancelled again
        self._tasks = []
        if self._pubsub is not None:
            await self._pubsub.aclose()
        telemetry.LIVE_CHANNELS.dec(len(self._channels))
        self._channels.clear()

    def subscribe(self, run_id: str) -> contextlib.AbstractAsyncContextManager[Subscription]:
        """A subscription to `run_id`'s live batches, active (confirmed by Redis) on entry."""
        return self._subscribe(self._keys.live(run_id).encode())

    def subscribe_thread(
        self, thread_id: str
    ) -> contextlib.AbstractAsyncContextManager[Subscription]:
        """A subscription woken (with an empty batch) each time a run of the thread starts."""
        return self._subscribe(self._keys.thread_live(thread_id).encode())

    def live_epoch(self, run_id: str) -> int | None:
        """The epoch of `run_id`'s channel when it is live in this process, else None. A
        reader may read history first and subscribe after: if its subscription's `joined`
        has this epoch, the channel delivered every batch published since, and a batch it
        holds past what was read was delivered before the reader joined (so it must read
        again from the stream); any later one is queued for the reader."""
        channel = self._channels.get(self._keys.live(run_id).encode())
        if channel is None or not channel.confirmed.is_set():
            return None
        return channel.epoch

    @contextlib.asynccontextmanager
    async def _subscribe(self, name: bytes) -> AsyncIterator[Subscription]:
        assert self._pubsub is not None, "Fanout.start() was not called"
        sub = Subscription(self._limit)
        channel = self._join(name, sub)
        sub.joined = (channel.epoch, channel.last)
        try:
            # Readers go on to read history, so the subscription must be live first; a missed
            # confirmation (Redis down, a slow subscribe) only costs a catch-up read, never an
            # event. Most joins find the channel live already: no timer for them.
            if not channel.confirmed.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await channel.confirmed.wait()
            # The confirmation marks subscribers for catch-up (it also follows reconnects);
            # a new one reads history next anyway, so it starts clean.
            sub.reset()
            yield sub
        finally:
            self._leave(name, channel, sub)

    def _join(self, name: bytes, sub: Subscription) -> _Channel:
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = _Channel(next(self._epochs))
            telemetry.LIVE_CHANNELS.inc()
            if name in self._active:
                # Still subscribed from an earlier client (its unsubscribe not yet sent): live.
                channel.confirmed.set()
            self._changed.set()
        channel.idle_since = None
        channel.subscribers.add(sub)
        return channel

    def _leave(self, name: bytes, channel: _Channel, sub: Subscription) -> None:
        sub.reset()
        channel.subscribers.discard(sub)
        if not channel.subscribers and self._channels.get(name) is channel:
            if self._linger <= 0 or self._closing:
                self._drop(name, channel)
                return
            loop = asyncio.get_running_loop()
            channel.idle_since = loop.time()
            loop.call_later(self._linger, self._expire, name, channel, loop)

    def _expire(self, name: bytes, channel: _Channel, loop: asyncio.AbstractEventLoop) -> None:
        """Drop `channel` if it has had no client for the whole linger (a client that came and
        left meanwhile set a later timer)."""
        idle = channel.idle_since
        if (
            self._channels.get(name) is channel
            and not channel.subscribers
            and idle is not None
            and loop.time() >= idle + self._linger - 0.001  # the loop's clock may count whole ms
        ):
            self._drop(name, channel)

    def _drop(self, name: bytes, channel: _Channel) -> None:
        del self._channels[name]
        telemetry.LIVE_CHANNELS.dec()
        self._changed.set()

    async def _syncer(self) -> None:
        """Subscribe the channels that gained clients, unsubscribe the ones that lost them."""
        assert self._pubsub is not None
        backoff = Backoff()
        task = asyncio.current_task()
        while True:
            await self._changed.wait()
            # redis-py can swallow a cancellation that lands inside a (un)subscribe: stop
            # anyway when asked to.
            if self._closing or (task is not None and task.cancelling()):
                return
            self._changed.clear()
            add = [n for n in self._channels if n not in self._active]
            drop = [n for n in self._active if n not in self._channels]
            try:
                if drop:
                    self._active.difference_update(drop)
                    await self._pubsub.unsubscribe(*drop)
                if add:
                    self._active.update(add)
                    await self._pubsub.subscribe(*add)
                    self._subscribed.set()
                backoff.reset()
            except NETWORK_ERRORS as exc:
                # Redis is away: try again until what is subscribed matches what is wanted
                # (unsubscribing or subscribing twice is harmless).
                self._active.difference_update(add)
                self._active.update(drop)
                delay = backoff.next_delay()
                log.warning("pub/sub (un)subscribe failed, retrying in %.2fs: %s", delay, exc)
                await asyncio.sleep(delay)
                self._changed.set()

    async def _reader(self) -> None:
        assert self._pubsub is not None
        pubsub = self._pubsub
        while True:
            try:
                if not pubsub.subscribed:
                    # Nothing to read until the first subscribe; it wakes this at once.
                    self._subscribed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await self._subscribed.wait()
                    continue
                msg = await pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except NETWORK_ERRORS as exc:
                log.warning("pub/sub connection lost: %s", exc)
                self._all_catch_up()
                await asyncio.sleep(0.5)
                continue
            if msg is None:
                continue
            kind = msg["type"]
            channel = self._channels.get(msg["channel"])
            if channel is None:
                continue
            if kind == "subscribe":
                channel.epoch = next(self._epochs)
                channel.confirmed.set()
                # After a reconnect redis-py re-subscribes; readers may have missed batches.
                for sub in channel.subscribers:
                    sub.mark_overflowed()
            elif kind == "message":
                try:
                    batch = LiveBatch.decode(msg["data"])
                except Exception:  # a malformed publish must not stop fan-out
                    log.exception("undecodable live batch on %r", msg["channel"])
                    channel.epoch = next(self._epochs)  # its readers missed a batch
                    continue
                if batch.entries:
                    channel.last = batch.entries[-1].id
                for sub in channel.subscribers:
                    sub.push(batch)

    def _all_catch_up(self) -> None:
        for channel in self._channels.values():
            channel.epoch = next(self._epochs)
            for sub in channel.subscribers:
                sub.mark_overflowed()
