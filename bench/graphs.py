"""Graphs the benchmarks run: the demo chat graph at a chosen token rate."""

from __future__ import annotations

import os
from typing import Any

from langchain_core.messages import BaseMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, MessagesState, StateGraph

from producer.demo import FakeStreamingChatModel

model = FakeStreamingChatModel(
    reply_words=int(os.environ.get("BENCH_WORDS", "100")),
    token_delay_ms=float(os.environ.get("BENCH_TOKEN_DELAY_MS", "20")),
)


async def llm(state: MessagesState, config: RunnableConfig) -> dict[str, list[BaseMessage]]:
    return {"messages": [await model.ainvoke(state["messages"], config)]}


def chat() -> Any:
    return (
        StateGraph(MessagesState)
        .add_node("llm", llm)
        .add_edge(START, "llm")
        .add_edge("llm", END)
        .compile()
    )
