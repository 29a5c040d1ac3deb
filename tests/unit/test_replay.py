"""A cancel carried out between attempts keeps what the last attempt streamed: the partial
message rebuilt from a run's stored events, in each stream protocol that stores them."""

from __future__ import annotations

from typing import Any

from langchain_core.messages import AIMessageChunk

from tests.graphs import GRAPHS
from tokenrelay.broker import codec
from tokenrelay.broker.graphs import GraphRegistry
from tokenrelay.broker.models import MESSAGES_EVENT, Entry, RunStatus, StreamId
from tokenrelay.broker.runs import RunRecord
from tokenrelay.producer.runner import AGENT_PROTOCOL, GraphRun

META = {"langgraph_node": "llm", "langgraph_step": 2, "langgraph_checkpoint_ns": "llm:1"}


def graph_run(**kwargs: Any) -> GraphRun:
    run = RunRecord("r", "t", "twostep", RunStatus.RUNNING, 0, 0, attempt=3, kwargs=kwargs)
    return GraphRun(GraphRegistry(GRAPHS, None), run)


class Stream:
    """A run's stored events, as `EventLog.history` gives them back."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []

    def add(self, name: str, data: Any, node: str | None = None) -> None:
        id_ = StreamId(len(self.entries) + 1, 0)
        raw = node.encode() if node is not None else None
        self.entries.append(Entry(id_, name, codec.json_bytes(data), node=raw))

    def attempt(self, n: int) -> None:
        self.add("metadata", {"run_id": "r", "attempt": n})

    def tuples(self, msg_id: str, *texts: str) -> None:
        for text in texts:
            self.add("messages", [AIMessageChunk(content=text, id=msg_id), META])

    def protocol(self, msg_id: str, *texts: str, finish: bool = False) -> None:
        self.add(MESSAGES_EVENT, {"event": "message-start", "role": "ai", "id": msg_id}, "llm")
        for text in texts:
            delta = {"type": "text-delta", "text": text}
            self.add(MESSAGES_EVENT, {"event": "content-block-delta", "index": 0,
                                      "delta": delta}, "llm")  # fmt: skip
        if finish:
            self.add(MESSAGES_EVENT, {"event": "message-finish"}, "llm")


def kept(run: GraphRun, stream: Stream, saved: frozenset[str] = frozenset()) -> tuple[str, str]:
    run.replay(stream.entries)
    found = run.partial_message(saved)
    assert found is not None
    message, node = found
    assert message.response_metadata["finish_reason"] == "cancelled"
    return str(message.id), f"{node}:{message.content}"


def test_messages_tuple_keeps_the_last_attempt_that_streamed() -> None:
    s = Stream()
    s.attempt(1)
    s.tuples("a", "first ", "try")
    s.attempt(2)
    s.tuples("b", "second ", "try ", "cut")
    s.attempt(3)  # took the run over and found the cancel: streamed nothing
    assert kept(graph_run(), s) == ("b", "llm:second try cut")


def test_a_message_the_thread_has_is_not_partial() -> None:
    # Attempt 2 finished its message (its node checkpointed it) and stopped in the next node:
    # attempt 1's message, cut short, is no longer what anyone saw last.
    s = Stream()
    s.attempt(1)
    s.tuples("a", "first")
    s.attempt(2)
    s.tuples("b", "whole reply")
    s.attempt(3)
    run = graph_run()
    run.replay(s.entries)
    assert run.partial_message(frozenset({"b"})) is None
    assert kept(graph_run(), s)[0] == "b"


def test_legacy_messages_mode_keeps_the_last_partial() -> None:
    s = Stream()
    s.attempt(1)
    s.add("messages/metadata", {"p": {"metadata": {**META, "langgraph_node": "plan"}}})
    s.add("messages/complete", [AIMessageChunk(content="plan", id="p")])
    s.add("messages/metadata", {"a": {"metadata": META}})
    s.add("messages/partial", [AIMessageChunk(content="so", id="a")])
    s.add("messages/partial", [AIMessageChunk(content="so far", id="a")])
    s.attempt(2)
    assert kept(graph_run(), s) == ("a", "llm:so far")


def test_protocol_runs_keep_the_text_of_the_unfinished_message() -> None:
    s = Stream()
    s.attempt(1)
    s.protocol("done", "a whole ", "message", finish=True)
    s.protocol("cut", "cut ", "short")
    s.attempt(2)
    assert kept(graph_run(stream_protocol=AGENT_PROTOCOL), s) == ("cut", "llm:cut short")


def test_a_run_that_streamed_no_message_keeps_none() -> None:
    s = Stream()
    s.attempt(1)
    s.add("values", {"messages": []})
    s.attempt(2)
    run = graph_run()
    run.replay(s.entries)
    assert run.partial_message() is None
