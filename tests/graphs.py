"""Graphs the tests register, next to the demo graph."""

from __future__ import annotations

import asyncio
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGenerationChunk
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from langgraph.types import interrupt

from tokenrelay.producer.demo import FakeStreamingChatModel, chat_graph

FAST_WORDS = 40
fast_model = FakeStreamingChatModel(reply_words=FAST_WORDS, token_delay_ms=2)
slow_model = FakeStreamingChatModel(reply_words=60, token_delay_ms=25)


_chat = chat_graph


fast = _chat(fast_model)
slow = _chat(slow_model)


class Boom(RuntimeError):
    pass


async def _explode(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
    # Stream a little first, so the failure happens mid-stream.
    await fast_model.ainvoke(state["messages"], config)
    raise Boom("the model caught fire")


failing = StateGraph(MessagesState).add_node("llm", _explode).add_edge(START, "llm").compile()


async def _think_then_answer(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
    await asyncio.sleep(2.5)  # longer than the tests' 1 s heartbeat interval
    return {"messages": [await fast_model.ainvoke(state["messages"], config)]}


quiet = (
    StateGraph(MessagesState)
    .add_node("llm", _think_then_answer)
    .add_edge(START, "llm")
    .add_edge("llm", END)
    .compile()
)


async def _plan(state: MessagesState) -> dict[str, Any]:
    return {"messages": [AIMessage(content="plan: answer word by word", name="planner")]}


def _two_step(model: FakeStreamingChatModel) -> Any:
    async def llm(state: MessagesState, config: RunnableConfig) -> dict[str, list[BaseMessage]]:
        return {"messages": [await model.ainvoke(state["messages"], config)]}

    return (
        StateGraph(MessagesState)
        .add_node("plan", _plan)
        .add_node("llm", llm)
        .add_edge(START, "plan")
        .add_edge("plan", "llm")
        .add_edge("llm", END)
        .compile()
    )


LONG_WORDS = 100
long_model = FakeStreamingChatModel(reply_words=LONG_WORDS, token_delay_ms=50)
# plan (checkpointed), then a 5 s streamed reply: long enough to kill or drain a worker mid-node
twostep = _two_step(long_model)


class _Pondering(FakeStreamingChatModel):
    """`long_model`, thinking 1.5 s before its first token, every time it is called."""

    async def _astream(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(1.5)
        async for chunk in super()._astream(*args, **kwargs):
            yield chunk


# `twostep` whose reply starts 1.5 s into its node: an attempt that takes the run over is
# set to stream, and has streamed nothing yet.
ponder = _two_step(_Pondering(reply_words=LONG_WORDS, token_delay_ms=50))

chatty_model = FakeStreamingChatModel(reply_words=300, token_delay_ms=2)
chatty = _chat(chatty_model)

FLOOD_EVENTS = 50_000


async def _flood(state: MessagesState) -> dict[str, Any]:
    write = get_stream_writer()
    pad = "x" * 1000
    for i in range(FLOOD_EVENTS):
        write({"i": i, "pad": pad})
        if i % 500 == 0:
            await asyncio.sleep(0)
    return {}


flood = StateGraph(MessagesState).add_node("flood", _flood).add_edge(START, "flood").compile()

# A parent graph whose `inner` node is a subgraph with the streaming `llm` node.
nested = (
    StateGraph(MessagesState)
    .add_node("inner", _chat(slow_model))
    .add_edge(START, "inner")
    .add_edge("inner", END)
    .compile()
)


class ToolCallingModel(FakeStreamingChatModel):
    """Streams some words, then a tool call argument by argument (slowly)."""

    async def _astream(self, messages, stop=None, run_manager=None, **kwargs):  # type: ignore[no-untyped-def,override]
        for piece in ["Let", " me", " look"]:
            await asyncio.sleep(0.02)
            yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
        yield ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[
            {"name": "search", "args": "", "id": "call_1", "index": 0}]))  # fmt: skip
        for part in ['{"q', 'uery": "re', "sumable", " streams", " and", " more", '"}']:
            await asyncio.sleep(0.2)
            yield ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[
                {"args": part, "index": 0}]))  # fmt: skip


tools = _chat(ToolCallingModel())


class ThinkingModel(FakeStreamingChatModel):
    """Streams its reasoning as content blocks (LangChain's `reasoning`, then Anthropic's
    `thinking`), then its answer as text blocks."""

    async def _astream(self, messages, stop=None, run_manager=None, **kwargs):  # type: ignore[no-untyped-def,override]
        blocks: list[dict[str, Any]] = [
            {"type": "reasoning", "reasoning": "The user"},
            {"type": "thinking", "thinking": " wants a word."},
            {"type": "text", "text": "Here"},
            {"type": "text", "text": " it is"},
        ]
        for block in blocks:
            await asyncio.sleep(0.01)
            yield ChatGenerationChunk(message=AIMessageChunk(content=[block]))


thinking = _chat(ThinkingModel())


async def _report(state: MessagesState) -> dict[str, Any]:
    """Custom events an app shows beside the reply: progress kept by id, a passing status."""
    write = get_stream_writer()
    write({"type": "progress", "id": "search", "done": 1, "of": 2})
    write({"type": "status", "text": "reading"})
    write({"type": "progress", "id": "search", "done": 2, "of": 2})
    write("plain")
    return {}


progress = (
    StateGraph(MessagesState)
    .add_node("report", _report)
    .add_node("llm", fast.nodes["llm"].bound)
    .add_edge(START, "report")
    .add_edge("report", "llm")
    .add_edge("llm", END)
    .compile()
)


class StubbornModel(FakeStreamingChatModel):
    """Streams slowly and swallows the first cancellation, as a client library's retry loop
    may, carrying on streaming."""

    async def _astream(self, messages, stop=None, run_manager=None, **kwargs):  # type: ignore[no-untyped-def,override]
        swallowed = False
        for i in range(200):
            try:
                await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed = True
            piece = f" w{i}" if not swallowed else f" after{i}"
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager:
                await run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk


stubborn = _chat(StubbornModel())


def _asking(node: Any) -> Any:
    """A graph whose node `ask` interrupts, then answers with the fast model."""
    return (
        StateGraph(MessagesState)
        .add_node("ask", node)
        .add_node("llm", fast.nodes["llm"].bound)
        .add_edge(START, "ask")
        .add_edge("ask", "llm")
        .add_edge("llm", END)
        .compile()
    )


def _ask(state: MessagesState) -> dict[str, list[BaseMessage]]:
    answer = interrupt({"question": "Go ahead?"})
    return {"messages": [AIMessage(content=f"You said {answer}")]}


def _approve(state: MessagesState) -> dict[str, list[BaseMessage]]:
    answer = interrupt({"question": "approve?"})
    return {"messages": [HumanMessage(content=f"answer: {answer}")]}


# Asks a question, then answers: the answer is an AI message (`ask`), or recorded as the
# user's (`approve`, as useStream v1's tests expect).
ask = _asking(_ask)
approve = _asking(_approve)


@tool
def lookup(query: str) -> str:
    """Look `query` up."""
    return f"found {query}"


def _call_tool(state: MessagesState) -> dict[str, list[BaseMessage]]:
    call = {"name": "lookup", "args": {"query": "streams"}, "id": "call_lookup"}
    return {"messages": [AIMessage(content="", tool_calls=[call])]}


# A model turn that calls a tool, the tool run by a ToolNode, then a streamed answer.
tooluse = (
    StateGraph(MessagesState)
    .add_node("call", _call_tool)
    .add_node("tools", ToolNode([lookup]))
    .add_node("llm", fast.nodes["llm"].bound)
    .add_edge(START, "call")
    .add_edge("call", "tools")
    .add_edge("tools", "llm")
    .add_edge("llm", END)
    .compile()
)


async def _after_the_reply(state: MessagesState) -> dict[str, list[BaseMessage]]:
    await asyncio.sleep(3)
    return {"messages": []}


# A streamed reply whose node completes, then a slow node that streams nothing: a cancel there
# finds no message partial.
afterword = (
    StateGraph(MessagesState)
    .add_node("llm", fast.nodes["llm"].bound)
    .add_node("after", _after_the_reply)
    .add_edge(START, "llm")
    .add_edge("llm", "after")
    .add_edge("after", END)
    .compile()
)


GRAPHS = {
    "ask": "tests.graphs:ask",
    "interrupt": "tests.graphs:approve",
    "tooluse": "tests.graphs:tooluse",
    "nested": "tests.graphs:nested",
    "tools": "tests.graphs:tools",
    "thinking": "tests.graphs:thinking",
    "progress": "tests.graphs:progress",
    "chatty": "tests.graphs:chatty",
    "flood": "tests.graphs:flood",
    "twostep": "tests.graphs:twostep",
    "ponder": "tests.graphs:ponder",
    "quiet": "tests.graphs:quiet",
    "agent": "tokenrelay.producer.demo:graph",
    "fast": "tests.graphs:fast",
    "afterword": "tests.graphs:afterword",
    "slow": "tests.graphs:slow",
    "failing": "tests.graphs:failing",
    "stubborn": "tests.graphs:stubborn",
}
