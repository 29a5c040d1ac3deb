"""A reader's live queue: what it tells a join about the batches waiting in it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tokenrelay.api import fanout
from tokenrelay.api.fanout import Subscription
from tokenrelay.broker.log import LiveBatch
from tokenrelay.broker.models import Entry, StreamId


def batch(*ids: int) -> LiveBatch:
    prev = StreamId(1, ids[0] - 1)
    return LiveBatch(prev, [Entry(StreamId(1, i), "messages", b"[]") for i in ids])


def test_a_batch_the_reader_already_has_is_nothing_new() -> None:
    # A batch published while the reader's catch-up was read holds what the catch-up returned:
    # the tail skips it and then waits, so a join must not hold its catch-up back for it.
    sub = Subscription(limit=100)
    assert not sub.queued_after(StreamId(1, 0))
    sub.push(batch(1, 2))
    assert sub.queued_after(StreamId(1, 1))
    assert not sub.queued_after(StreamId(1, 2))
    sub.push(batch(3))
    assert sub.queued_after(StreamId(1, 2))
    sub.mark_overflowed()
    assert not sub.queued_after(StreamId(1, 0))


Offer = Callable[[LiveBatch], bool]


async def waiting_reader(
    sub: Subscription, takes: bool
) -> tuple[asyncio.Future[LiveBatch | None], list[LiveBatch], Offer]:
    """A reader waiting on `sub` that takes (or refuses) what it is offered, the batches
    offered to it, and its offer."""
    offered: list[LiveBatch] = []

    def offer(b: LiveBatch) -> bool:
        offered.append(b)
        return takes

    waiting = asyncio.ensure_future(sub.get(5.0, offer))
    await asyncio.sleep(0)
    return waiting, offered, offer


async def test_a_waiting_reader_is_offered_each_batch_and_what_it_takes_is_not_queued() -> None:
    sub = Subscription(limit=100)
    waiting, taken, _ = await waiting_reader(sub, takes=True)
    first, second = batch(1, 2), batch(3)
    sub.push(first)
    sub.push(second)
    await asyncio.sleep(0.01)
    assert taken == [first, second]
    assert not waiting.done()  # the reader was not woken for what it took
    assert not sub.queued_after(StreamId(1, 0))
    waiting.cancel()


async def test_after_a_refused_batch_the_rest_queue_behind_it_in_order() -> None:
    # Once one batch is left to the reader, a later one taken directly would reach its client
    # before it: every batch queues until the reader waits again.
    sub = Subscription(limit=100)
    waiting, offered, refuse = await waiting_reader(sub, takes=False)
    first, second, third = batch(1), batch(2), batch(3)
    sub.push(first)
    sub.push(second)
    assert offered == [first]
    assert await waiting is first
    sub.push(third)  # the reader is not waiting: queued, offered to nobody
    assert offered == [first]
    assert await sub.get(5.0, refuse) is second
    assert await sub.get(5.0, refuse) is third
    assert offered == [first]


async def test_a_failing_offer_leaves_the_batch_to_the_reader_and_stops_the_offers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fanout, "_offering", [True])
    sub = Subscription(limit=100)
    offers = 0

    def broken(b: LiveBatch) -> bool:
        nonlocal offers
        offers += 1
        raise RuntimeError("bug")

    waiting = asyncio.ensure_future(sub.get(5.0, broken))
    await asyncio.sleep(0)
    first, second = batch(1), batch(2)
    sub.push(first)
    assert await waiting is first
    waiting = asyncio.ensure_future(sub.get(5.0, broken))
    await asyncio.sleep(0)
    sub.push(second)
    assert await waiting is second
    assert offers == 1


async def test_batches_taken_while_waiting_put_off_the_idle_timeout() -> None:
    sub = Subscription(limit=100)
    waiting = asyncio.ensure_future(sub.get(1.0, lambda b: True))
    for i in range(1, 31):
        await asyncio.sleep(0.05)
        sub.push(batch(i))
        assert not waiting.done()  # 1.5 s in at the end: still not idle
    assert await waiting is None  # idle 1 s after the last batch it took
