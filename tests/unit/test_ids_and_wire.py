"""Stream ids, Last-Event-ID parsing and SSE framing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.sse import SSE, Comment, parse_block
from tokenrelay.api.sse import HEARTBEAT, format_event
from tokenrelay.broker import codec
from tokenrelay.broker.errors import InvalidEventId
from tokenrelay.broker.models import ZERO_ID, Entry, StreamId

u64 = st.integers(min_value=0, max_value=2**64 - 1)


@given(u64, u64)
def test_stream_id_round_trips(ms: int, seq: int) -> None:
    sid = StreamId(ms, seq)
    assert StreamId.parse(str(sid)) == sid
    assert StreamId.parse_last_event_id(str(sid)) == sid


@given(u64, u64, u64, u64)
def test_stream_ids_order_like_redis(a: int, b: int, c: int, d: int) -> None:
    assert (StreamId(a, b) < StreamId(c, d)) == ((a, b) < (c, d))


@pytest.mark.parametrize("value", ["-1", "0", " -1 ", "0-0"])
def test_replay_from_start(value: str) -> None:
    assert StreamId.parse_last_event_id(value) == ZERO_ID


@given(st.text())
def test_anything_else_is_either_an_id_or_invalid(value: str) -> None:
    try:
        sid = StreamId.parse_last_event_id(value)
    except InvalidEventId as exc:
        assert "Last-Event-ID" in str(exc)
    else:
        assert sid == ZERO_ID or str(sid) == value.strip()


@given(
    st.from_regex(r"[a-z/|:-]{1,20}", fullmatch=True),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
        max_leaves=10,
    ),
    u64,
    u64,
)
def test_sse_frame_parses_back(name: str, payload: object, ms: int, seq: int) -> None:
    data = codec.json_bytes(payload)
    frame = format_event(Entry(StreamId(ms, seq), name, data)).decode()
    assert frame.endswith("\n\n") and frame.count("\n\n") == 1  # JSON never holds a raw newline
    parsed = parse_block(frame[:-2])
    assert parsed == SSE(name, data.decode(), f"{ms}-{seq}")
    assert parse_block(HEARTBEAT.decode()[:-2]) == Comment("heartbeat")


def test_splice_tuple_is_the_json_pair() -> None:
    chunk, meta = {"content": "hi", "type": "AIMessageChunk"}, {"langgraph_node": "llm"}
    spliced = codec.splice_tuple(codec.json_bytes(chunk), codec.json_bytes(meta))
    assert codec.json_loads(spliced) == [chunk, meta]


@given(st.text(), st.text(), st.booleans())
def test_content_split_splices_back_to_the_same_bytes(
    content: str, msg_id: str, last: bool
) -> None:
    from langchain_core.messages import AIMessageChunk

    from tokenrelay.producer.runner import _tuple_event

    chunk = AIMessageChunk(content=content, id=msg_id or None)
    if last:
        chunk = AIMessageChunk(content=content, id=msg_id or None, chunk_position="last")
    meta = {"langgraph_node": "llm", "langgraph_step": 1}
    event = _tuple_event("messages", chunk, codec.json_bytes(meta))
    assert event.content_only
    assert event.blob is not None
    wire = codec.splice_content(event.data, event.blob)
    assert wire == codec.splice_tuple(codec.json_bytes(chunk), codec.json_bytes(meta))


def test_tuple_events_reuse_the_invariant_part_only_while_it_is_the_same() -> None:
    from langchain_core.messages import AIMessageChunk

    from tokenrelay.producer.runner import _TupleEvents

    meta = {"langgraph_node": "llm", "langgraph_step": 1}
    usage = {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}
    chunks = [
        AIMessageChunk(content="Hel", id="m1"),
        AIMessageChunk(content="lo", id="m1"),
        AIMessageChunk(content="", id="m1", response_metadata={"finish_reason": "stop"}),
        AIMessageChunk(content="", id="m1", usage_metadata=usage, chunk_position="last"),
        AIMessageChunk(content="Next", id="m2"),
        AIMessageChunk(content=[{"type": "text", "text": "x"}], id="m2"),
        AIMessageChunk(content="!", id="m2", extra_field=1),
    ]
    encode = _TupleEvents()
    for chunk in chunks:
        event = encode("messages", chunk, meta)
        wire = (
            codec.splice_content(event.data, event.blob)
            if event.content_only
            else codec.splice_tuple(event.data, event.blob or b"")
        )
        assert wire == codec.splice_tuple(codec.json_bytes(chunk), codec.json_bytes(meta))
    # A model that changes a chunk it already handed over does not change what was cached.
    first = AIMessageChunk(content="a", id="m3", response_metadata={"k": 1})
    encode("messages", first, meta)
    first.response_metadata["k"] = 2
    second = AIMessageChunk(content="b", id="m3", response_metadata={"k": 2})
    event = encode("messages", second, meta)
    assert codec.splice_content(event.data, event.blob or b"") == codec.splice_tuple(
        codec.json_bytes(second), codec.json_bytes(meta)
    )
