"""Graphs the benchmarks run.

`chat` is the demo chat graph at a chosen token rate. `paced` is the suite's producer: the same
one-node chat graph over a model whose reply is set by the run's input, so one worker serves
runs of any length and pace, and each token carries the wall-clock time it was produced at
(``ts<19-digit monotonic_ns>``), which the load generator subtracts from its receive time.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langgraph.config import get_stream_writer
from langgraph.graph import START, MessagesState, StateGraph

from bench.pacing import Pace
from tokenrelay.producer.demo import FakeStreamingChatModel, chat_graph


def chat() -> Any:
    """A graph factory: reads the pace when the worker loads it."""
    return chat_graph(
        FakeStreamingChatModel(
            reply_words=int(os.environ.get("BENCH_WORDS", "100")),
            token_delay_ms=float(os.environ.get("BENCH_TOKEN_DELAY_MS", "20")),
        )
    )


def _pace_of(messages: list[BaseMessage]) -> Pace:
    content = messages[-1].content if messages else "{}"
    return Pace.from_json(orjson.loads(content if isinstance(content, str) else "{}"))


async def paced_tokens(pace: Pace) -> AsyncIterator[str]:
    """Each token of `pace`, stamped and yielded when it is due."""
    for i, due in enumerate(pace.schedule(time.monotonic())):
        wait = due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        elif i % 64 == 0:
            await asyncio.sleep(0)  # unpaced: let other runs through now and then
        yield pace.token(i, due)


class PacedModel(BaseChatModel):
    """Streams ``ts<monotonic_ns> xxxx`` tokens at the pace its last input message asks for
    (JSON)."""

    @property
    def _llm_type(self) -> str:
        return "tokenrelay-bench-paced"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        text = "".join(_pace_of(messages).token(i) for i in range(_pace_of(messages).tokens))
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        raise NotImplementedError("the bench graph streams asynchronously")

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        async for piece in paced_tokens(_pace_of(messages)):
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager:
                await run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk


def paced() -> Any:
    return chat_graph(PacedModel())


def paced_writer() -> Any:
    """The same tokens from a node that emits them with LangGraph's stream writer (`custom`
    stream mode): what the relay costs when the producer itself costs next to nothing."""

    async def emit(state: MessagesState) -> dict[str, Any]:
        write = get_stream_writer()
        i = 0
        async for piece in paced_tokens(_pace_of(state["messages"])):
            write({"i": i, "content": piece})
            i += 1
        return {}

    return StateGraph(MessagesState).add_node("emit", emit).add_edge(START, "emit").compile()
