"""The AI SDK adapter's parts: a live batch offered to a reader and refused by its connection
leaves the reader's state as it was, so the reader renders it the same when it takes it."""

from __future__ import annotations

from typing import Any

from tokenrelay.api.routes.aisdk import UIParts
from tokenrelay.broker import codec
from tokenrelay.broker.models import Entry, StreamId


def token(n: int, text: str, msg_id: str = "m1") -> Entry:
    chunk = {"type": "AIMessageChunk", "content": text, "id": msg_id}
    return Entry(StreamId.parse(f"{n}-0"), "messages", codec.json_bytes([chunk, {}]))


def error(n: int) -> Entry:
    body = {"error": "GraphFailed", "message": "boom"}
    return Entry(StreamId.parse(f"{n}-0"), "error", codec.json_bytes(body))


def parts(chunk: bytes) -> list[dict[str, Any]]:
    return [codec.json_loads(line[6:]) for line in chunk.split(b"\n\n") if line]


def test_a_refused_offer_leaves_the_batch_to_be_rendered_as_if_never_offered() -> None:
    first, second = [token(1, "Hello ")], [token(2, "there"), token(3, "Bye", "m2"), error(4)]
    reference = UIParts("r")
    expected = [reference.render(first), reference.render(second)]

    ui = UIParts("r")
    for batch, want in zip((first, second), expected, strict=True):
        assert not ui.offer(batch, lambda _: False)
        assert ui.render(batch) == want  # what the reader sends once it takes the batch
    assert (ui.open_text, ui.failed) == (reference.open_text, reference.failed) == ("m2", True)
    assert [p["type"] for p in parts(expected[0])] == ["text-start", "text-delta"]
    assert [p["type"] for p in parts(expected[1])] == [
        "text-delta", "text-end", "text-start", "text-delta", "error",
    ]  # fmt: skip


def test_a_taken_offer_writes_what_the_reader_would_have_sent() -> None:
    batches = [[token(1, "Hello ")], [token(2, "there")], [token(3, "Bye", "m2")]]
    reference = UIParts("r")
    expected = [reference.render(b) for b in batches]
    written: list[bytes] = []

    def write(chunk: bytes) -> bool:
        written.append(chunk)
        return True

    ui = UIParts("r")
    assert all(ui.offer(b, write) for b in batches)
    assert written == expected
    assert ui.open_text == "m2"
