"""Cancel: a durable request key per run plus a message on the owning worker's control channel
(sharded on a cluster, see ``tokenrelay/broker/pubsub.py``).

The worker acts on the pub/sub message at once, and also sees the key on its next flush (the
append script returns it), so a lost message delays a cancel but never loses it. Both go in one
round trip (one pipeline, in order on one Redis): on a busy API every round trip is a wait for
the event loop's next turn.
"""

from __future__ import annotations

from enum import StrEnum
from typing import cast

from tokenrelay.broker import codec, pubsub
from tokenrelay.broker.connection import RedisClient
from tokenrelay.broker.keys import Keys
from tokenrelay.broker.scripts import AnyPipeline


class CancelAction(StrEnum):
    INTERRUPT = "interrupt"
    """Stop, keep the partial output in the thread, end as `interrupted`."""
    ROLLBACK = "rollback"
    """Stop, restore the thread to its state before the run, delete the run."""


class CancelSignal:
    def __init__(self, redis: RedisClient, keys: Keys, *, ttl_seconds: int) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl = ttl_seconds

    async def request(self, run_id: str, action: CancelAction, worker_id: str) -> None:
        """Record the cancel durably, then tell the owner (if the run has one yet)."""
        pipe = self._redis.pipeline(transaction=False)
        self.request_in(pipe, run_id, action, worker_id)
        await pipe.execute()

    def request_in(
        self, pipe: AnyPipeline, run_id: str, action: CancelAction, worker_id: str
    ) -> None:
        """Queue `request` on `pipe`: its replies are the SET's, then the PUBLISH's if any."""
        pipe.set(self._keys.run_cancel(run_id), action.value, ex=self._ttl)
        if worker_id:
            message = codec.pack({"run_id": run_id, "action": action.value})
            pubsub.publish_in(pipe, self._redis, self._keys.ctl(worker_id), message)

    async def pending(self, run_id: str) -> CancelAction | None:
        raw = cast(bytes | None, await self._redis.get(self._keys.run_cancel(run_id)))
        return CancelAction(raw.decode()) if raw else None
