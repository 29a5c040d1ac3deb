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

    def thread_pending(self, thread_id: str) -> str:
        """List of run ids waiting for the thread's active run to end (multitask enqueue)."""
        return f"{self.prefix}:thread:{{{thread_id}}}:pending"

    def threads_index(self) -> str:
        return f"{self.prefix}:threads"

    def queue(self) -> str:
        return f"{self.prefix}:queue"

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
