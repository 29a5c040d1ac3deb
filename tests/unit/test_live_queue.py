"""A reader's live queue: what it tells a join about the batches waiting in it."""

from __future__ import annotations

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
