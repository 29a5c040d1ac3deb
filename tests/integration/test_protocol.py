"""The agent streaming protocol (`@langchain/react` 1.x): commands, the thread's event stream over
SSE and WebSocket, exact resume by seq, cancel that keeps the partial reply, interrupts, subgraph
namespaces, tools, and bad input answered with the protocol's error codes."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from tests.conftest import RedisServer, make_settings
from tests.graphs import FAST_WORDS
from tests.integration.test_api_stream import gauge_reaches
from tests.server import Tokenrelay, WorkerProcess
from tests.sse import SSE, iter_sse
from tokenrelay.api import agentstream
from tokenrelay.broker.connection import RedisClient, connect
from tokenrelay.broker.embedded import EmbeddedRedis
from tokenrelay.broker.keys import Keys
from tokenrelay.broker.settings import Settings

pytestmark = [pytest.mark.timeout(120), pytest.mark.redis("standalone", "cluster")]

ALL = ["values", "updates", "messages", "tools", "lifecycle", "input", "checkpoints", "tasks",
       "custom"]  # fmt: skip


def user(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


async def command(
    client: httpx.AsyncClient, tid: str, method: str, params: dict[str, Any], cid: int = 1
) -> httpx.Response:
    body = {"id": cid, "method": method, "params": params}
    return await client.post(f"/threads/{tid}/commands", json=body)


async def start(client: httpx.AsyncClient, tid: str, assistant: str, inp: Any = None) -> str:
    r = await command(client, tid, "run.start", {"assistant_id": assistant, "input": inp})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["type"] == "success" and answer["id"] == 1
    assert isinstance(answer["meta"]["applied_through_seq"], int)
    return str(answer["result"]["run_id"])


@asynccontextmanager
async def subscription(
    client: httpx.AsyncClient, tid: str, channels: list[str] = ALL, **extra: Any
) -> AsyncIterator[AsyncIterator[Any]]:
    """The thread's event stream: yields each event (the envelope) as it arrives."""
    body = {"channels": channels, **extra}
    async with client.stream("POST", f"/threads/{tid}/stream/events", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")

        async def envelopes() -> AsyncIterator[Any]:
            async for item in iter_sse(r):
                if isinstance(item, SSE):
                    env = item.json()
                    assert item.event == env["method"] and item.id == str(env["seq"])
                    yield env

        yield envelopes()


async def until_terminal(events: AsyncIterator[Any], runs: int = 1) -> list[Any]:
    """Events up to the `runs`-th root terminal lifecycle event."""
    out: list[Any] = []
    async with asyncio.timeout(60):
        async for env in events:
            out.append(env)
            data = env["params"]["data"]
            if (
                env["method"] == "lifecycle"
                and env["params"]["namespace"] == []
                and data["event"] in ("completed", "failed", "interrupted")
            ):
                runs -= 1
                if runs == 0:
                    return out
    raise AssertionError("the stream ended before the run did")


def text_of(events: list[Any], namespace_prefix: str | None = None) -> str:
    return "".join(
        e["params"]["data"]["delta"]["text"]
        for e in events
        if e["method"] == "messages"
        and e["params"]["data"]["event"] == "content-block-delta"
        and (
            namespace_prefix is None or e["params"]["namespace"][:1][0].startswith(namespace_prefix)
        )
    )


def ai_text(message: dict[str, Any]) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(block.get("text", "") for block in content)


async def state_messages(client: httpx.AsyncClient, tid: str) -> list[dict[str, Any]]:
    r = await client.get(f"/threads/{tid}/state")
    assert r.status_code == 200
    return list(r.json()["values"]["messages"])


async def test_run_start_streams_a_reply_as_the_protocol_encodes_it(
    client: httpx.AsyncClient,
) -> None:
    tid = str(uuid.uuid4())  # a new thread: run.start creates it
    async with subscription(client, tid) as events:
        run_id = await start(client, tid, "fast", user("hello"))
        got = await until_terminal(events)
    seqs = [e["seq"] for e in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert all(e["event_id"].split("-")[0] == str(e["seq"]) for e in got)
    root = [e for e in got if e["params"]["namespace"] == []]
    assert root[0]["method"] == "lifecycle"
    assert root[0]["params"]["data"] == {"event": "running", "graph_name": "fast", "run_id": run_id}
    kinds = [e["params"]["data"]["event"] for e in got if e["method"] == "messages"]
    deltas = ["content-block-delta"] * FAST_WORDS
    assert kinds == ["message-start", "content-block-start", *deltas, "content-block-finish",
                     "message-finish"]  # fmt: skip
    messages = [e for e in got if e["method"] == "messages"]
    assert all(e["params"]["node"] == "llm" for e in messages)
    finished = messages[-2]["params"]["data"]["content"]
    reply = (await state_messages(client, tid))[-1]
    assert (
        finished
        == {"type": "text", "text": ai_text(reply)}
        == {"type": "text", "text": text_of(got)}
    )
    assert messages[0]["params"]["data"]["id"] == reply["id"]
    assert got[-1]["params"]["data"] == {"event": "completed"}
    values = [e for e in got if e["method"] == "values"]
    assert ai_text(values[-1]["params"]["data"]["messages"][-1]) == ai_text(reply)
    assert {e["method"] for e in got} >= {"updates", "checkpoints"}
    update = next(e for e in got if e["method"] == "updates")["params"]["data"]
    assert update["node"] == "llm" and "messages" in update["values"]


async def test_since_replays_exactly_what_was_missed_and_seq_spans_runs(
    client: httpx.AsyncClient,
) -> None:
    tid = str(uuid.uuid4())
    async with subscription(client, tid) as events:
        await start(client, tid, "fast", user("one"))
        first = await until_terminal(events)
        await start(client, tid, "fast", user("two"))
        second = await until_terminal(events)
    assert min(e["seq"] for e in second) > max(e["seq"] for e in first)
    everything = first + second
    for cut in (first[3]["seq"], first[-1]["seq"], second[10]["seq"]):
        async with subscription(client, tid, since=cut) as events:
            replay = await until_terminal(events, runs=2 if cut < first[-1]["seq"] else 1)
        assert replay == [e for e in everything if e["seq"] > cut]
    # The SSE id as a Last-Event-ID header is the same cursor.
    cut = first[-1]["seq"]
    async with client.stream("POST", f"/threads/{tid}/stream/events", json={"channels": ALL},
                             headers={"Last-Event-ID": str(cut)}) as r:  # fmt: skip
        got = []
        async with asyncio.timeout(30):
            async for item in iter_sse(r):
                if isinstance(item, SSE):
                    got.append(item.json())
                    if got[-1]["seq"] == second[-1]["seq"]:
                        break
    assert got == second
    r = await client.post(f"/threads/{tid}/stream/events", json={"channels": ALL},
                          headers={"Last-Event-ID": "nope"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"] == "invalid_argument"
    # No cursor: the latest run again, whole (the client drops what it has by event_id).
    async with subscription(client, tid) as events:
        assert await until_terminal(events) == second
    # A filtered replay keeps the same seqs and ids.
    async with subscription(client, tid, channels=["lifecycle"], since=0) as events:
        lifecycle = await until_terminal(events, runs=2)
    assert lifecycle == [e for e in everything if e["method"] == "lifecycle"]


async def test_subscriptions_waiting_on_a_live_run_get_its_batches_written_from_the_fan_out(
    client: httpx.AsyncClient, fanout_writes: dict[bool, int]
) -> None:
    """Subscriptions waiting for a run's next batch have it written to them by the fan-out
    (`SERVER_WRITE`), filtered for each; every subscription gets the run exactly, over two
    runs, whichever way each batch went."""
    tid = str(uuid.uuid4())

    subscribed = 0
    all_subscribed = asyncio.Event()

    async def read(channels: list[str]) -> list[Any]:
        nonlocal subscribed
        async with subscription(client, tid, channels) as events:
            subscribed += 1  # the response started: its subscription is made
            if subscribed == 5:
                all_subscribed.set()
            return await until_terminal(events, runs=2)

    everything = asyncio.create_task(read(ALL))
    messages = [asyncio.create_task(read(["messages", "lifecycle"])) for _ in range(4)]
    await all_subscribed.wait()
    await start(client, tid, "slow", user("one"))
    async with subscription(client, tid, ["lifecycle"]) as events:
        await until_terminal(events)
    await start(client, tid, "fast", user("two"))
    reference = await everything
    got = await asyncio.gather(*messages)
    assert fanout_writes[True] > 50  # the slow run's tokens, one at a time, to 5 subscriptions
    wanted = [e for e in reference if e["method"] in ("messages", "lifecycle")]
    assert all(g == wanted for g in got)
    async with subscription(client, tid, since=0) as events:
        assert await until_terminal(events, runs=2) == reference


async def test_the_stream_outlives_runs_with_heartbeats(client: httpx.AsyncClient) -> None:
    tid = str(uuid.uuid4())
    body = {"channels": ["lifecycle"]}
    async with client.stream("POST", f"/threads/{tid}/stream/events", json=body) as r:
        items = iter_sse(r)
        first = await anext(items)
        assert not isinstance(first, SSE)  # a heartbeat comment while no run exists
        await start(client, tid, "fast", user("late"))
        async with asyncio.timeout(30):
            async for item in items:
                if isinstance(item, SSE) and item.json()["params"]["data"]["event"] == "completed":
                    break


async def test_stop_keeps_the_partial_reply_and_names_its_checkpoint(
    client: httpx.AsyncClient,
) -> None:
    tid = str(uuid.uuid4())
    async with subscription(client, tid, channels=["messages", "lifecycle"]) as events:
        run_id = await start(client, tid, "slow", user("stop me"))
        got: list[Any] = []
        async for env in events:
            got.append(env)
            if text_of(got).count(" ") >= 5:
                break
        r = await client.post(f"/threads/{tid}/runs/{run_id}/cancel", params={"wait": 1})
        assert r.status_code == 200 and r.json()["status"] == "interrupted"
        got += await until_terminal(events)
    end = got[-1]["params"]["data"]
    assert end["event"] == "interrupted"
    state = (await client.get(f"/threads/{tid}/state")).json()
    assert end["checkpoint"] == {"id": state["checkpoint"]["checkpoint_id"]}
    partial = state["values"]["messages"][-1]
    assert partial["type"] == "ai" and ai_text(partial) == text_of(got)
    assert 5 <= ai_text(partial).count(" ") < 59


async def test_an_interrupt_arrives_on_input_and_respond_resumes_it(
    client: httpx.AsyncClient,
) -> None:
    tid = str(uuid.uuid4())
    async with subscription(client, tid, channels=["input", "lifecycle", "messages"]) as events:
        await start(client, tid, "ask", user("hi"))
        got = await until_terminal(events)
        asked = [e for e in got if e["method"] == "input.requested"]
        assert len(asked) == 1 and asked[0]["params"]["data"]["payload"] == {
            "question": "Go ahead?"
        }
        assert got[-1]["params"]["data"]["event"] == "interrupted"
        interrupt_id = asked[0]["params"]["data"]["interrupt_id"]
        bad = await command(client, tid, "input.respond",
                            {"namespace": [], "interrupt_id": "nope", "response": "x"})  # fmt: skip
        assert bad.status_code == 404 and bad.json()["error"] == "no_such_interrupt"
        answer = {"namespace": [], "interrupt_id": interrupt_id, "response": "yes"}
        r = await command(client, tid, "input.respond", answer)
        assert r.status_code == 200 and r.json()["type"] == "success", r.text
        resumed = await until_terminal(events)
    assert resumed[-1]["params"]["data"]["event"] == "completed"
    messages = await state_messages(client, tid)
    assert ai_text(messages[-2]) == "You said yes"
    assert ai_text(messages[-1]) == text_of(resumed)
    whole = [e["params"]["data"]["event"] for e in resumed if e["method"] == "messages"][:4]
    assert whole == ["message-start", "content-block-start", "content-block-finish",
                     "message-finish"]  # fmt: skip


async def test_subgraph_events_carry_its_namespace_and_filters_apply(
    client: httpx.AsyncClient,
) -> None:
    tid = str(uuid.uuid4())
    async with subscription(client, tid, channels=["messages", "lifecycle"]) as events:
        await start(client, tid, "nested", user("deep"))
        got = await until_terminal(events)
    started = [e for e in got if e["params"]["data"].get("event") == "started"]
    assert len(started) == 1
    (inner_ns,) = {tuple(e["params"]["namespace"]) for e in got if e["method"] == "messages"}
    assert len(inner_ns) == 1 and inner_ns[0].startswith("inner:")
    assert started[0]["params"]["namespace"] == list(inner_ns)
    reply = (await state_messages(client, tid))[-1]
    assert text_of(got, "inner") == ai_text(reply)
    # Prefix and depth filters, replayed from the start.
    async with subscription(client, tid, channels=["messages", "lifecycle"],
                            namespaces=[["inner"]], since=0) as events:  # fmt: skip
        inner_only = []
        async with asyncio.timeout(30):
            async for env in events:
                inner_only.append(env)
                if env["params"]["data"].get("event") == "completed":
                    break
    assert inner_only == [e for e in got if e["params"]["namespace"][:1] == [inner_ns[0]]]
    async with subscription(client, tid, channels=["messages", "lifecycle"],
                            namespaces=[[]], depth=0, since=0) as events:  # fmt: skip
        root_only = await until_terminal(events)
    assert root_only == [e for e in got if e["params"]["namespace"] == []]


async def test_tool_calls_and_tool_events(client: httpx.AsyncClient) -> None:
    tid = str(uuid.uuid4())
    async with subscription(client, tid, channels=["messages", "tools", "lifecycle"]) as events:
        await start(client, tid, "tooluse", user("look it up"))
        got = await until_terminal(events)
    tools = [e["params"]["data"] for e in got if e["method"] == "tools"]
    assert [t["event"] for t in tools] == ["tool-started", "tool-finished"]
    assert tools[0]["tool_call_id"] == "call_lookup" and tools[0]["tool_name"] == "lookup"
    assert tools[0]["input"] == {"query": "streams"}
    blocks = [
        e["params"]["data"]["content"]
        for e in got
        if e["method"] == "messages" and e["params"]["data"]["event"] == "content-block-finish"
    ]
    assert blocks[0]["type"] == "tool_call" and blocks[0]["name"] == "lookup"


async def test_websocket_commands_and_subscriptions(relay: Tokenrelay, client: httpx.AsyncClient
) -> None:  # fmt: skip
    tid = str(uuid.uuid4())
    url = relay.url.replace("http://", "ws://") + f"/threads/{tid}/stream/events"
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"id": 1, "method": "subscription.subscribe",
                                  "params": {"channels": ["messages", "lifecycle"]}}))  # fmt: skip
        answer = json.loads(await ws.recv())
        assert answer["type"] == "success" and answer["id"] == 1
        sub_id = answer["result"]["subscription_id"]
        params = {"assistant_id": "fast", "input": user("ws")}
        await ws.send(json.dumps({"id": 2, "method": "run.start", "params": params}))
        got: list[Any] = []
        started = None
        async with asyncio.timeout(60):
            while True:
                frame = json.loads(await ws.recv())
                if frame["type"] == "success":
                    started = frame
                    continue
                got.append(frame)
                if (
                    frame["method"] == "lifecycle"
                    and frame["params"]["data"]["event"] == "completed"
                ):
                    break
        assert started is not None and started["id"] == 2
        reply = (await state_messages(client, tid))[-1]
        assert text_of(got) == ai_text(reply)
        await ws.send(json.dumps({"id": 3, "method": "subscription.unsubscribe",
                                  "params": {"subscription_id": sub_id}}))  # fmt: skip
        assert json.loads(await ws.recv()) == {"type": "success", "id": 3, "result": {}}
        await ws.send(json.dumps({"id": 4, "method": "subscription.unsubscribe",
                                  "params": {"subscription_id": sub_id}}))  # fmt: skip
        assert json.loads(await ws.recv())["error"] == "no_such_subscription"
        await ws.send("not json")
        assert json.loads(await ws.recv())["error"] == "invalid_argument"
        await ws.send(json.dumps({"id": 5, "method": "nope", "params": {}}))
        assert json.loads(await ws.recv())["error"] == "unknown_command"


async def _socket_events(ws: Any, until: Any) -> list[Any]:
    """The events a socket gets (answers skipped) up to and including the first `until`."""
    got: list[Any] = []
    async with asyncio.timeout(60):
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] != "event":
                assert frame["type"] == "success", frame
                continue
            got.append(frame)
            if until(frame):
                return got


def _root_end(frame: Any) -> bool:
    return bool(
        frame["method"] == "lifecycle"
        and frame["params"]["namespace"] == []
        and frame["params"]["data"]["event"] in ("completed", "failed", "interrupted")
    )


async def _thread_events(client: httpx.AsyncClient, tid: str, channels: list[str]) -> list[Any]:
    async with subscription(client, tid, channels, since=0) as events:
        return await until_terminal(events)


async def test_a_sockets_subscriptions_get_its_events_in_seq_order_each_once(
    relay: Tokenrelay, client: httpx.AsyncClient
) -> None:
    """A client pauses its streams at a run's terminal lifecycle event: whatever a socket
    sends after it, though older, is never read. So the socket's subscriptions (the client
    keeps one for lifecycle and input beside its content one) come as one stream in seq
    order, an event two of them want sent once (the client hands it to both)."""
    tid = str(uuid.uuid4())
    url = relay.url.replace("http://", "ws://") + f"/threads/{tid}/stream/events"
    wanted = ["lifecycle", "input", "messages", "values"]
    async with websockets.connect(url) as ws:
        for cid, channels in enumerate(
            (["lifecycle", "input"], ["messages", "values", "lifecycle"])
        ):
            body = {"id": cid + 1, "method": "subscription.subscribe",
                    "params": {"channels": channels}}  # fmt: skip
            await ws.send(json.dumps(body))
        params = {"assistant_id": "fast", "input": user("in order")}
        await ws.send(json.dumps({"id": 3, "method": "run.start", "params": params}))
        got = await _socket_events(ws, _root_end)
    seqs = [e["seq"] for e in got]
    assert seqs == sorted(set(seqs)), "in seq order, each once"
    expected = await _thread_events(client, tid, wanted)
    assert seqs == [e["seq"] for e in expected]
    assert got[-2]["method"] == "values", "the final values before the run's end"
    assert text_of(got) == ai_text((await state_messages(client, tid))[-1])


async def test_a_subscription_made_mid_run_gets_the_run_from_its_start(
    relay: Tokenrelay, client: httpx.AsyncClient
) -> None:
    """A second subscription on a socket whose first is already inside a run gets that run's
    events from its start (what the socket had sent, read back), then the rest live: no gap,
    no duplicate, in order."""
    tid = str(uuid.uuid4())
    url = relay.url.replace("http://", "ws://") + f"/threads/{tid}/stream/events"
    async with websockets.connect(url) as ws:
        body = {"id": 1, "method": "subscription.subscribe",
                "params": {"channels": ["lifecycle", "messages"]}}  # fmt: skip
        await ws.send(json.dumps(body))
        params = {"assistant_id": "slow", "input": user("join me")}
        await ws.send(json.dumps({"id": 2, "method": "run.start", "params": params}))
        first = await _socket_events(ws, lambda f: len(text_of([f])) > 0)
        first += await _socket_events(ws, lambda f: text_of([f]).strip() != "")
        body = {"id": 3, "method": "subscription.subscribe", "params": {"channels": ["values"]}}
        await ws.send(json.dumps(body))
        rest = await _socket_events(ws, _root_end)
    values = [e for e in rest if e["method"] == "values"]
    expected = await _thread_events(client, tid, ["values", "lifecycle"])
    assert [e["seq"] for e in values] == [e["seq"] for e in expected if e["method"] == "values"]
    assert len(values) >= 2, "the input's values (replayed) and the final values (live)"
    assert values[0]["seq"] < first[-1]["seq"] < values[-1]["seq"]
    streamed = [e["seq"] for e in first + rest if e["method"] != "values"]
    assert streamed == sorted(set(streamed))
    full = await _thread_events(client, tid, ["lifecycle", "messages"])
    assert streamed == [e["seq"] for e in full]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"method": "run.start", "params": {}}, 400, "invalid_argument"),
        ({"id": "1", "method": "run.start"}, 400, "invalid_argument"),
        ({"id": 1, "method": 7}, 400, "invalid_argument"),
        ({"id": 1, "method": "run.start", "params": []}, 400, "invalid_argument"),
        ({"id": 1, "method": "nope.nope", "params": {}}, 400, "unknown_command"),
        ({"id": 1, "method": "subscription.subscribe", "params": {}}, 400, "not_supported"),
        ({"id": 1, "method": "run.start", "params": {}}, 400, "invalid_argument"),
        (
            {"id": 1, "method": "run.start", "params": {"assistant_id": "ghost"}},
            400,
            "invalid_argument",
        ),
        (
            {"id": 1, "method": "run.start", "params": {"assistant_id": "fast", "config": 3}},
            400,
            "invalid_argument",
        ),
        ({"id": 1, "method": "agent.getTree", "params": {}}, 404, "no_such_run"),
        (
            {"id": 1, "method": "input.respond", "params": {"responses": []}},
            400,
            "invalid_argument",
        ),
        (
            {"id": 1, "method": "state.fork", "params": {"checkpoint_id": "nope"}},
            400,
            "invalid_argument",
        ),
        ([1, 2], 400, "invalid_argument"),
    ],
)
async def test_bad_commands_get_the_protocols_error_codes(
    client: httpx.AsyncClient, body: Any, status: int, code: str
) -> None:
    r = await client.post(f"/threads/{uuid.uuid4()}/commands", json=body)
    assert r.status_code == status, r.text
    answer = r.json()
    assert answer["type"] == "error" and answer["error"] == code and answer["message"]


async def test_bad_streams_and_bodies_are_4xx(client: httpx.AsyncClient) -> None:
    tid = str(uuid.uuid4())
    r = await client.post(f"/threads/{tid}/commands", content=b"{nope")
    assert r.status_code == 400 and r.json()["error"] == "invalid_argument"
    r = await client.post("/threads/a{b/commands", json={"id": 1, "method": "state.get"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_argument"
    for body, fragment in [
        ({"channels": ["values", "nope"]}, "unknown channel"),
        ({"channels": []}, "channels"),
        ({"channels": ["values"], "since": -1}, "since"),
        ({"channels": ["values"], "since": "3"}, "since"),
        ({"channels": ["values"], "since": 10**6}, "past the thread's last event"),
        ({"channels": ["values"], "namespaces": "a"}, "namespaces"),
        ({"channels": ["values"], "depth": -2}, "depth"),
    ]:
        r = await client.post(f"/threads/{tid}/stream/events", json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"] == "invalid_argument" and fragment in r.json()["message"]
    r = await client.post(f"/threads/{tid}/stream/events", content=b"[")
    assert r.status_code == 400


async def test_state_commands(client: httpx.AsyncClient) -> None:
    tid = str(uuid.uuid4())
    async with subscription(client, tid, channels=["lifecycle"]) as events:
        await start(client, tid, "fast", user("state"))
        await until_terminal(events)
    got = (await command(client, tid, "state.get", {"namespace": []})).json()["result"]
    state = (await client.get(f"/threads/{tid}/state")).json()
    assert got["values"] == state["values"]
    assert got["checkpoint"] == {"id": state["checkpoint"]["checkpoint_id"]}
    listed = (await command(client, tid, "state.listCheckpoints", {"limit": 2})).json()
    ids = [c["id"] for c in listed["result"]["checkpoints"]]
    assert len(ids) == 2 and ids[0] == state["checkpoint"]["checkpoint_id"]
    r = await command(client, tid, "state.fork", {"checkpoint_id": "nope"})
    assert r.status_code == 404 and r.json()["error"] == "no_such_checkpoint"
    r = await command(client, tid, "state.fork", {"checkpoint_id": ids[1], "input": user("again")})
    assert r.status_code == 200 and r.json()["result"]["thread_id"] == tid


async def _run_cost(
    relay: Tokenrelay, client: httpx.AsyncClient, graph: str
) -> tuple[int, int, int]:
    """(tokens, wire bytes on every channel, Redis bytes of the run's keys) of one run."""
    tid = str(uuid.uuid4())
    body = {"channels": ALL}
    async with client.stream("POST", f"/threads/{tid}/stream/events", json=body) as r:
        run_id = await start(client, tid, graph, user("count"))
        buf = b""
        async with asyncio.timeout(60):
            async for chunk in r.aiter_bytes():
                buf += chunk
                if b'"event":"completed"' in buf:
                    break
    keys = Keys(relay.settings.key_prefix)
    redis = connect(relay.settings.resolved_redis_url(), cluster=relay.settings.redis_cluster)
    try:
        stored = 0
        for key in (keys.run_events(run_id), keys.run_blobs(run_id)):
            stored += int(await redis.memory_usage(key, samples=0) or 0)
    finally:
        await redis.aclose()
    return buf.count(b'"content-block-delta"'), len(buf), stored


async def test_redis_keeps_a_quarter_of_the_wire_bytes_per_token(
    relay: Tokenrelay, client: httpx.AsyncClient
) -> None:
    """What one more token costs Redis against what a subscriber of every channel receives
    for it (the difference between a 300-token and a 40-token reply, so a run's fixed events
    are left out and the token's copies in `values`, `updates` and the block's finish count)."""
    short = await _run_cost(relay, client, "fast")
    long = await _run_cost(relay, client, "chatty")
    assert (short[0], long[0]) == (FAST_WORDS, 300)
    tokens = long[0] - short[0]
    wire, stored = (long[1] - short[1]) / tokens, (long[2] - short[2]) / tokens
    assert stored <= 0.25 * wire, (stored, wire)


async def _queued_run_then_worker(
    s: Settings, own: EmbeddedRedis, meanwhile: Callable[[RedisClient], Awaitable[None]]
) -> list[Any]:
    """A protocol subscription to a thread whose run waits for a worker (an API with none);
    `meanwhile` runs before a worker starts the run; the subscription's events to its end."""
    api = Tokenrelay(s, with_worker=False).start()
    worker: Tokenrelay | None = None
    redis = connect(own.url)
    try:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as c:
            tid = str(uuid.uuid4())
            async with subscription(c, tid, ["lifecycle", "messages"]) as events:
                await start(c, tid, "fast", user("wait"))
                await meanwhile(redis)
                worker = Tokenrelay(s).start()
                async with asyncio.timeout(15):
                    got = await until_terminal(events)
        assert got[-1]["params"]["data"]["event"] == "completed"
        deltas = [e for e in got if e["params"]["data"].get("event") == "content-block-delta"]
        assert len(deltas) == FAST_WORDS
        return got
    finally:
        if worker is not None:
            worker.stop()
        api.stop()
        await redis.aclose()


async def test_a_subscription_to_a_queued_run_looks_rarely(own_redis: EmbeddedRedis) -> None:
    """While the thread's run waits for a worker, the subscription relies on the run's start
    being announced: it looks at the thread's runs a few times with growing waits, not 20
    times a second (the server's Redis counts the looks), and hears the start."""

    async def count_looks(redis: RedisClient) -> None:
        before = await redis.info("commandstats")
        await asyncio.sleep(2.5)
        after = await redis.info("commandstats")
        looks = (
            after["cmdstat_zrangebyscore"]["calls"]
            - before.get("cmdstat_zrangebyscore", {"calls": 0})["calls"]
        )
        assert looks <= 12, f"{looks} looks at the thread's runs in 2.5 s"

    await _queued_run_then_worker(make_settings(own_redis), own_redis, count_looks)


async def test_a_subscription_to_a_queued_run_hears_its_start_after_pubsub_reconnected(
    own_redis: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API's pub/sub connection drops while the run waits (announcements may be missed
    until it has subscribed again): the subscription listens again and looks at once, so the
    start is heard with no look due for a minute (neither a look nor a heartbeat is)."""
    monkeypatch.setattr(agentstream, "QUEUED_POLL_SECONDS", 60.0)
    monkeypatch.setattr(agentstream, "QUEUED_POLL_MAX_SECONDS", 60.0)

    async def drop_pubsub(redis: RedisClient) -> None:
        await asyncio.sleep(0.3)
        assert await redis.client_kill_filter(_type="pubsub") >= 1

    s = make_settings(own_redis, heartbeat_seconds=60.0)
    await _queued_run_then_worker(s, own_redis, drop_pubsub)


async def test_subscriptions_whose_clients_left_end_on_the_server(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Clients that read a run to its end and hang up, as a page does, leave no subscription
    running on the server: not even one whose cancellation Redis' client swallowed as the
    client left (it is cancelled again), which would otherwise look at Redis every heartbeat
    for as long as the process lives."""
    s = make_settings(redis_server)
    api = WorkerProcess(s, tmp_path / "api.log", command="api").start()
    worker = WorkerProcess(s, tmp_path / "worker.log").start()
    try:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as c:

            async def one() -> None:
                tid = str(uuid.uuid4())
                async with subscription(c, tid, ["lifecycle"]) as events:
                    await start(c, tid, "fast", user("bye"))
                    await until_terminal(events)

            await asyncio.gather(*(one() for _ in range(50)))
            left = await gauge_reaches(c, "tokenrelay_api_streams_open", 0, tries=50, every=0.1)
        assert left == 0, f"{left} subscriptions still running after their clients left"
    finally:
        worker.stop()
        api.stop()
