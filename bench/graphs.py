"""Graphs the benchmarks run: the demo chat graph at a chosen token rate."""

from __future__ import annotations

import os
from typing import Any

from producer.demo import FakeStreamingChatModel, chat_graph


def chat() -> Any:
    """A graph factory: reads the pace when the worker loads it."""
    return chat_graph(
        FakeStreamingChatModel(
            reply_words=int(os.environ.get("BENCH_WORDS", "100")),
            token_delay_ms=float(os.environ.get("BENCH_TOKEN_DELAY_MS", "20")),
        )
    )
