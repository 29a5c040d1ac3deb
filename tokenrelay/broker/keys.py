"""Every Redis key and channel tokenrelay uses, and nothing else builds one.

Keys of a run share the hash tag ``{run_id}`` and keys of a thread share ``{thread_id}``, so each
multi-key script touches one slot and runs unchanged on Redis Cluster.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "tr"

    def run_events(self, run_id: str) -> str:
        return f"{self.prefix}:run:{{{run_id}}}:events"

    def run_meta(self, run_id: str) -> str:
        return f"{self.prefix}:run:{{{run_id}}}:meta"

    def run_blobs(self, run_id: str) -> str:
        """Hash of the distinct `messages` metadata blobs of a run, stored once each."""
        return f"{self.prefix}:run:{{{run_id}}}:blobs"

    def run_cancel(self, run_id: str) -> str:
        return f"{self.prefix}:run:{{{run_id}}}:cancel"

    def live(self, run_id: str) -> str:
        return f"{self.prefix}:live:{{{run_id}}}"

    def thread_live(self, thread_id: str) -> str:
        """Channel told when a run of the thread starts (its events get their seq range)."""
        return f"{self.prefix}:tlive:{{{thread_id}}}"

    def thread_meta(self, thread_id: str) -> str:
        return f"{self.prefix}:thread:{{{thread_id}}}:meta"

    def thread_active(self, thread_id: str) -> str:
        return f"{self.prefix}:thread:{{{thread_id}}}:active"

    def thread_runs(self, thread_id: str) -> str:
        """Sorted set of a thread's run ids by creation time."""
        return f"{self.prefix}:thread:{{{thread_id}}}:runs"

    def thread_since(self, thread_id: str) -> str:
        """When (ms) the thread's active pointer last named a new run: a run promoted from the
        thread's queue is young as an active run, however long it waited."""
        return f"{self.prefix}:thread:{{{thread_id}}}:since"

    def thread_released(self, thread_id: str) -> str:
        """The thread's last release of its active run: what a release sent again answers."""
        return f"{self.prefix}:thread:{{{thread_id}}}:released"

    def thread_pending(self, thread_id: str) -> str:
        """List of run ids waiting for the thread's active run to end (multitask enqueue)."""
        return f"{self.prefix}:thread:{{{thread_id}}}:pending"

    # The thread index spans threads: its keys share the hash tag `{threads}` (one slot of a
    # Redis Cluster, so a search intersects them in one command) and are written with commands
    # of their own, never in a script with a thread's keys.

    def threads_index(self) -> str:
        """Sorted set of every thread id by creation time."""
        return f"{self.prefix}:threads:{{threads}}:created"

    def threads_by_update(self) -> str:
        """Sorted set of every thread id by its last update (`updated_at`)."""
        return f"{self.prefix}:threads:{{threads}}:updated"

    def threads_with_status(self, status: str) -> str:
        """Sorted set (scores 0) of the threads whose last run left them `status` (idle,
        error), or that may have an active run (busy)."""
        return f"{self.prefix}:threads:{{threads}}:status:{status}"

    def threads_with_metadata(self, digest: str) -> str:
        """Sorted set (scores 0) of the threads whose metadata holds one key and value (named
        by the digest of both)."""
        return f"{self.prefix}:threads:{{threads}}:meta:{digest}"

    def threads_query(self, token: str) -> str:
        """A search's intermediate result, deleted after use (and expiring in any case)."""
        return f"{self.prefix}:threads:{{threads}}:q:{token}"

    def queue(self) -> str:
        return f"{self.prefix}:queue"

    def lease_clock(self) -> str:
        """When a worker last read Redis's clock, and until when takeovers wait (see
        `RunQueue.reclaim`): in the queue's hash slot, which its tag names."""
        return f"{{{self.prefix}:queue}}:clock"

    def queue_delayed(self) -> str:
        """Jobs of runs that start later (`after_seconds`), scored by when (ms)."""
        return f"{self.prefix}:queue:delayed"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    def epoch(self) -> str:
        """When (ms) this Redis began to hold tokenrelay's data (see `RunStore.data_since`)."""
        return f"{self.prefix}:epoch"

    def probe(self) -> str:
        """A short-lived key `/readyz` writes, to tell a Redis that refuses writes."""
        return f"{self.prefix}:probe"

    def ctl(self, worker_id: str) -> str:
        return f"{self.prefix}:ctl:{worker_id}"
