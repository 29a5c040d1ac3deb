"""Structured logs and Prometheus metrics, shared by both processes."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from tokenrelay.broker import codec


class LoopCounter(Collector):
    """A Prometheus counter for what happens per event per client: a plain integer that the
    event loop's thread adds to and a scrape reads, where `Counter.inc` takes a lock each time.
    Only ever incremented from one thread."""

    def __init__(self, name: str, documentation: str) -> None:
        self._name = name
        self._documentation = documentation
        self.value = 0
        REGISTRY.register(self)

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self._name, self._documentation)

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self._name, self._documentation, value=self.value)


RUNS_STARTED = Counter("tokenrelay_runs_started", "Run attempts started by workers")
RUNS_FINISHED = Counter(
    "tokenrelay_runs_finished", "Runs ended by workers, by final status", ["status"]
)
RUNS_FAILED = Counter("tokenrelay_runs_failed", "Runs that ended with an error event")
RUNS_RECLAIMED = Counter(
    "tokenrelay_runs_reclaimed", "Runs taken over from a worker whose lease lapsed"
)
RUNS_HANDED_BACK = Counter("tokenrelay_runs_handed_back", "Runs re-queued by a draining worker")
EVENTS_PUBLISHED = Counter("tokenrelay_events_published", "Events appended to run streams")
PUBLISH_FLUSHES = Counter("tokenrelay_publish_flushes", "Pipelined append round trips to Redis")
RUNS_ACTIVE = Gauge("tokenrelay_worker_runs_active", "Runs executing in this worker")

# Context fields a log record may carry (passed with ``extra=``).
CONTEXT_FIELDS = ("run_id", "thread_id", "worker_id", "attempt", "assistant_id")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the run context fields when present."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return codec.json_bytes(out).decode()


class TextFormatter(logging.Formatter):
    """Plain lines with ``key=value`` context appended."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ctx = " ".join(
            f"{k}={getattr(record, k)}" for k in CONTEXT_FIELDS if getattr(record, k, None)
        )
        return f"{line} {ctx}" if ctx else line


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger once per process; ``fmt`` is ``text`` or ``json``."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# API side.
STREAMS_OPEN = Gauge("tokenrelay_api_streams_open", "SSE responses being served")
EVENTS_SENT = LoopCounter("tokenrelay_api_events_sent", "Events written to clients")
RESUMES = Counter("tokenrelay_api_resumes", "Stream requests resuming after a Last-Event-ID")
GAPS = Counter("tokenrelay_api_stream_gaps", "StreamGap errors sent for trimmed history")
SLOW_CLIENT_FALLBACKS = Counter(
    "tokenrelay_api_slow_client_fallbacks",
    "Live queues that overflowed and fell back to catch-up reads",
)
STREAMS_ABORTED = Counter(
    "tokenrelay_api_streams_aborted", "Responses cut short (time budget or shutdown) for resume"
)
LIVE_CHANNELS = Gauge("tokenrelay_api_live_channels", "Runs with a shared live subscription")
LIVE_QUEUED_ENTRIES = Gauge(
    "tokenrelay_api_live_queued_entries",
    "Live entries queued for clients that have not taken them yet (bounded per client)",
)
