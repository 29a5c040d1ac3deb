"""The demo graph: a one-node chat graph over a deterministic fake streaming chat model.

Everything runs offline; the same input always streams the same reply, word by word.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.graph.state import CompiledStateGraph

from tokenrelay.broker.settings import get_settings

_VOCABULARY = (
    "stream token relay resume agent graph redis event chunk reply thread state cancel "
    "worker client server message partial checkpoint branch fork heartbeat proxy buffer "
    "replica lease queue consumer producer history live fan out order exact gap duplicate "
    "network tab refresh mobile budget deadline serverless function edge cluster slot hash "
    "tag script batch flush window latency throughput memory bounded slow fast durable "
    "signal abort flush keep work"
).split()


def _text_of(message: BaseMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    return " ".join(
        part if isinstance(part, str) else str(part.get("text", "")) for part in content
    )


def reply_words(messages: Sequence[BaseMessage], n_words: int) -> list[str]:
    """The reply's words: a pure function of the conversation, so runs are reproducible."""
    seed_text = "\n".join(f"{m.type}:{_text_of(m)}" for m in messages)
    seed = int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "big")
    rng = random.Random(seed)
    return [rng.choice(_VOCABULARY) for _ in range(n_words)]


def reply_text(messages: Sequence[BaseMessage], n_words: int) -> str:
    return " ".join(reply_words(messages, n_words))


class FakeStreamingChatModel(BaseChatModel):
    """Streams a deterministic reply word by word, `token_delay_ms` apart on its own clock.

    A non-streaming call takes the same total time, so background runs behave like streamed ones.
    """

    reply_words: int | None = None
    token_delay_ms: float | None = None

    @property
    def _llm_type(self) -> str:
        return "tokenrelay-fake-streaming"

    def _settings(self) -> tuple[int, float]:
        s = get_settings()
        words = s.demo_reply_words if self.reply_words is None else self.reply_words
        delay = s.demo_token_delay_ms if self.token_delay_ms is None else self.token_delay_ms
        return words, delay / 1000.0

    def _pieces(self, messages: list[BaseMessage]) -> list[str]:
        n_words, _ = self._settings()
        words = reply_words(messages, n_words)
        return [w if i == 0 else " " + w for i, w in enumerate(words)]

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        pieces = self._pieces(messages)
        time.sleep(self._settings()[1] * len(pieces))
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content="".join(pieces)))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        pieces = self._pieces(messages)
        await asyncio.sleep(self._settings()[1] * len(pieces))
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content="".join(pieces)))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        delay = self._settings()[1]
        start = time.monotonic()
        for i, piece in enumerate(self._pieces(messages), 1):
            time.sleep(max(0.0, start + i * delay - time.monotonic()))
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        delay = self._settings()[1]
        start = time.monotonic()
        for i, piece in enumerate(self._pieces(messages), 1):
            # Word i is ready at start + i x delay, however long the words before it took to
            # be taken: a provider streams at its own pace, which a busy reader does not slow.
            await asyncio.sleep(max(0.0, start + i * delay - time.monotonic()))
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager:
                await run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk


def chat_graph(model: BaseChatModel) -> CompiledStateGraph[Any, Any, Any, Any]:
    """A `MessagesState` graph with one node, `llm`, that answers with `model`."""

    async def llm(state: MessagesState, config: RunnableConfig) -> dict[str, list[BaseMessage]]:
        return {"messages": [await model.ainvoke(state["messages"], config)]}

    return (
        StateGraph(MessagesState)
        .add_node("llm", llm)
        .add_edge(START, "llm")
        .add_edge("llm", END)
        .compile()
    )


model = FakeStreamingChatModel()
graph = chat_graph(model)
