"""Cancel that keeps the work: interrupt, rollback, multitask strategies, durable cancel."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import RedisServer, make_settings
from tests.integration.test_stream import new_thread, run_body, stream_run, wait_status
from tests.server import Tokenrelay
from tests.sse import SSE, events, until_messages
from tokenrelay.broker import codec, pubsub
from tokenrelay.broker.connection import RedisClient, connect
from tokenrelay.broker.keys import Keys
from tokenrelay.broker.log import EventLog
from tokenrelay.broker.models import END_EVENT, Event, Job, RunStatus
from tokenrelay.broker.runs import RunRecord, RunStore, new_id, now_ms
from tokenrelay.producer import worker as worker_module

pytestmark = [pytest.mark.timeout(120), pytest.mark.redis("standalone", "cluster")]


@pytest.fixture(scope="module")
def replica_b(relay: Tokenrelay) -> Iterator[Tokenrelay]:
    server = Tokenrelay(relay.settings, with_worker=False).start()
    yield server
    server.stop()


def chunks_text(evts: list[SSE]) -> str:
    return "".join(e.json()[0]["content"] for e in evts if e.event == "messages")


async def test_interrupt_from_another_replica_keeps_the_partial_message(
    client: httpx.AsyncClient, replica_b: Tokenrelay
) -> None:
    tid = await new_thread(client)
    async with client.stream("POST", f"/threads/{tid}/runs/stream", json=run_body("slow")) as r:
        head = await until_messages(r, 10)
        run_id = head[0].json()["run_id"]
        async with httpx.AsyncClient(base_url=replica_b.url, timeout=30) as b:
            cancelled = await b.post(
                f"/threads/{tid}/runs/{run_id}/cancel", params={"wait": 1, "action": "interrupt"}
            )
        evts = head + await events(r)
    assert cancelled.status_code == 200
    run = cancelled.json()
    assert run["status"] == "interrupted"
    received = chunks_text(evts)
    assert 0 < len(received.split()) < 60
    assert evts[-1].event == "values"
    saved = evts[-1].json()["messages"]
    assert saved[-1]["content"] == received
    state = (await client.get(f"/threads/{tid}/state")).json()
    partial = state["values"]["messages"][-1]
    assert partial["type"] == "ai"
    assert partial["content"] == received
    assert partial["response_metadata"]["finish_reason"] == "cancelled"
    assert run["checkpoint_id"] == state["checkpoint"]["checkpoint_id"]
    assert (await client.get(f"/threads/{tid}")).json()["status"] == "idle"

    # the next run continues from it; a run forked from the returned checkpoint branches
    follow, _ = await stream_run(client, tid, run_body("fast"))
    msgs = follow[-1].json()["messages"]
    assert [m["type"] for m in msgs] == ["human", "ai", "human", "ai"]
    assert msgs[1]["content"] == received
    fork, _ = await stream_run(client, tid, run_body("fast", checkpoint_id=run["checkpoint_id"]))
    assert len(fork[-1].json()["messages"]) == 4
    history = (await client.post(f"/threads/{tid}/history", json={"limit": 50})).json()
    parents = {h["parent_checkpoint_id"] for h in history}
    assert run["checkpoint_id"] in parents


@pytest.mark.parametrize(
    "body",
    [
        # LangGraph writes its last checkpoint while it unwinds the cancel: a cancel asked for
        # again meanwhile must not cut that write short.
        run_body("slow", durability="exit"),
        # The model takes the first cancellation and carries on streaming.
        run_body("stubborn"),
    ],
    ids=["checkpointed-only-at-exit", "model-swallows-the-cancel"],
)
async def test_an_interrupted_run_keeps_its_input_and_its_partial_reply(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    tid = await new_thread(client)
    async with client.stream("POST", f"/threads/{tid}/runs/stream", json=body) as r:
        head = await until_messages(r, 5)
        run_id = head[0].json()["run_id"]
        cancelled = await client.post(
            f"/threads/{tid}/runs/{run_id}/cancel", params={"wait": 1, "action": "interrupt"}
        )
        evts = head + await events(r)
    assert cancelled.json()["status"] == "interrupted"
    received = chunks_text(evts)
    assert 0 < len(received.split()) < 100
    messages = (await client.get(f"/threads/{tid}/state")).json()["values"]["messages"]
    assert [m["type"] for m in messages] == ["human", "ai"]
    assert messages[-1]["content"] == received


async def test_rollback_restores_the_state_before_the_run(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    await stream_run(client, tid, run_body("fast"))
    before = (await client.get(f"/threads/{tid}/state")).json()["values"]
    async with client.stream("POST", f"/threads/{tid}/runs/stream", json=run_body("slow")) as r:
        head = await events(r, limit=6)
        run_id = head[0].json()["run_id"]
        resp = await client.post(
            f"/threads/{tid}/runs/{run_id}/cancel", params={"wait": 1, "action": "rollback"}
        )
        rest = await events(r)
    assert resp.status_code == 204
    assert all(e.event != "values" or e in head for e in rest)
    assert (await client.get(f"/threads/{tid}/state")).json()["values"] == before
    assert (await client.get(f"/threads/{tid}/runs/{run_id}")).status_code == 404


async def test_cancel_of_finished_and_unknown_runs(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    evts, _ = await stream_run(client, tid, run_body("fast"))
    run_id = evts[0].json()["run_id"]
    r = await client.post(f"/threads/{tid}/runs/{run_id}/cancel")
    assert r.status_code == 202
    assert r.json()["status"] == "success"
    r = await client.post(f"/threads/{tid}/runs/{run_id}/cancel", params={"wait": 1})
    assert r.json()["status"] == "success"
    assert (await client.post(f"/threads/{tid}/runs/nope/cancel")).status_code == 404
    r = await client.post(f"/threads/{tid}/runs/{run_id}/cancel", params={"action": "explode"})
    assert r.status_code == 422


async def test_thread_only_stop_cancels_whatever_is_active(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    run = (await client.post(f"/threads/{tid}/runs", json=run_body("slow"))).json()
    await asyncio.sleep(0.5)
    r = await client.post("/runs/cancel", json={"thread_id": tid})
    assert r.status_code == 204
    await wait_status(client, tid, run["run_id"], "interrupted")
    assert (await client.post("/runs/cancel", json={"thread_id": tid})).status_code == 404
    assert (await client.post("/runs/cancel", json={"status": "all"})).status_code == 422


async def test_multitask_reject_and_enqueue_order(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    first = (await client.post(f"/threads/{tid}/runs", json=run_body("slow"))).json()
    r = await client.post(
        f"/threads/{tid}/runs", json=run_body("fast", multitask_strategy="reject")
    )
    assert r.status_code == 409
    assert "already running" in r.json()["detail"]
    second = (await client.post(f"/threads/{tid}/runs", json=run_body("fast"))).json()
    third = (await client.post(f"/threads/{tid}/runs", json=run_body("fast"))).json()
    for run in (first, second, third):
        await wait_status(client, tid, run["run_id"], "success")
    runs = {r["run_id"]: r for r in (await client.get(f"/threads/{tid}/runs")).json()}
    order = sorted((first, second, third), key=lambda x: runs[x["run_id"]]["updated_at"])
    assert [x["run_id"] for x in order] == [first["run_id"], second["run_id"], third["run_id"]]
    msgs = (await client.get(f"/threads/{tid}/state")).json()["values"]["messages"]
    assert len(msgs) == 6


async def test_multitask_interrupt_keeps_the_partial_and_starts_the_new_run(
    client: httpx.AsyncClient,
) -> None:
    tid = await new_thread(client)
    first = (await client.post(f"/threads/{tid}/runs", json=run_body("slow"))).json()
    await asyncio.sleep(0.6)
    body = run_body("fast", multitask_strategy="interrupt")
    evts, _ = await stream_run(client, tid, body)
    assert (await client.get(f"/threads/{tid}/runs/{first['run_id']}")).json()[
        "status"
    ] == "interrupted"
    msgs = evts[-1].json()["messages"]
    assert [m["type"] for m in msgs] == ["human", "ai", "human", "ai"]
    assert msgs[1]["response_metadata"]["finish_reason"] == "cancelled"


async def test_a_late_stop_of_an_old_run_leaves_the_new_one_active(
    client: httpx.AsyncClient,
) -> None:
    tid = await new_thread(client)
    first, _ = await stream_run(client, tid, run_body("fast"))
    second = (await client.post(f"/threads/{tid}/runs", json=run_body("slow"))).json()
    await client.post(f"/threads/{tid}/runs/{first[0].json()['run_id']}/cancel", params={"wait": 1})
    assert (await client.get(f"/threads/{tid}")).json()["status"] == "busy"
    await wait_status(client, tid, second["run_id"], "success")


async def cancel_midway(
    client: httpx.AsyncClient,
    relay: Tokenrelay,
    signal: Callable[[RedisClient, str], Awaitable[Any]],
) -> None:
    """Stream a slow run, `signal` its cancel straight through Redis after a few events, and
    check the run stopped early as `interrupted` with its final `values`."""
    tid = await new_thread(client)
    async with client.stream("POST", f"/threads/{tid}/runs/stream", json=run_body("slow")) as r:
        head = await events(r, limit=6)
        run_id = head[0].json()["run_id"]
        redis = connect(relay.settings.resolved_redis_url())
        await signal(redis, run_id)
        await redis.aclose()
        rest = await events(r)
    assert rest[-1].event == "values"
    run = (await client.get(f"/threads/{tid}/runs/{run_id}")).json()
    assert run["status"] == "interrupted"
    assert chunks_text(head + rest).count(" ") + 1 < 60


async def test_cancel_arrives_through_the_durable_key_without_pub_sub(
    client: httpx.AsyncClient, relay: Tokenrelay
) -> None:
    keys = Keys(relay.settings.key_prefix)
    # Only the durable half: no control message is published.
    await cancel_midway(
        client, relay, lambda redis, run_id: redis.set(keys.run_cancel(run_id), "interrupt", ex=60)
    )


async def test_cancel_arrives_through_pub_sub_alone(
    client: httpx.AsyncClient, relay: Tokenrelay
) -> None:
    # Only the control message (sharded on a cluster), no durable key: the worker's control
    # subscription alone must stop the run.
    assert relay.worker is not None
    channel = Keys(relay.settings.key_prefix).ctl(relay.worker.id)

    def publish(redis: RedisClient, run_id: str) -> Awaitable[Any]:
        message = codec.pack({"run_id": run_id, "action": "interrupt"})
        return pubsub.publish(redis, channel, message)

    await cancel_midway(client, relay, publish)


async def test_interrupt_inside_a_subgraph_saves_as_the_parent_node(
    client: httpx.AsyncClient,
) -> None:
    tid = await new_thread(client)
    body = run_body("nested", stream_subgraphs=True)
    async with client.stream("POST", f"/threads/{tid}/runs/stream", json=body) as r:
        head = await until_messages(r, 8, "messages|")
        run_id = head[0].json()["run_id"]
        await client.post(f"/threads/{tid}/runs/{run_id}/cancel", params={"wait": 1})
        evts = head + await events(r)
    received = "".join(e.json()[0]["content"] for e in evts if e.event.startswith("messages|"))
    assert received
    state = (await client.get(f"/threads/{tid}/state")).json()
    assert state["values"]["messages"][-1]["content"] == received
    history = (await client.post(f"/threads/{tid}/history", json={"limit": 1})).json()
    assert history[0]["metadata"]["source"] == "update"
    assert state["next"] == []  # written as `inner`, the parent's node: the graph is done


async def test_interrupt_mid_tool_call_keeps_text_and_sets_the_call_aside(
    client: httpx.AsyncClient,
) -> None:
    tid = await new_thread(client)
    async with client.stream("POST", f"/threads/{tid}/runs/stream", json=run_body("tools")) as r:
        head = await until_messages(r, 6)
        run_id = head[0].json()["run_id"]
        await client.post(f"/threads/{tid}/runs/{run_id}/cancel", params={"wait": 1})
        await events(r)
    partial = (await client.get(f"/threads/{tid}/state")).json()["values"]["messages"][-1]
    assert partial["content"] == "Let me look"
    assert partial["tool_calls"] == []
    assert partial["additional_kwargs"]["cancelled_tool_calls"][0]["name"] == "search"
    # the thread stays usable: the next turn runs
    follow, _ = await stream_run(client, tid, run_body("fast"))
    assert follow[-1].json()["messages"][-1]["type"] == "ai"


BATCHES = 40


@pytest.mark.redis("standalone")  # commands counted on the one Redis
async def test_a_stop_waits_for_the_end_without_reading_the_run_per_batch(
    redis_server: RedisServer,
) -> None:
    # No worker here: the run's worker is elsewhere, and this test writes what it would.
    settings = make_settings(redis_server, heartbeat_seconds=30.0)
    server = Tokenrelay(settings, with_worker=False).start()
    redis = connect(redis_server.url)
    keys = Keys(settings.key_prefix)
    log = EventLog(redis, keys, maxlen=100, ttl_seconds=60)

    async def run_reads() -> int:
        stats = await redis.info("commandstats")
        return int(stats.get("cmdstat_hgetall", {}).get("calls", 0))

    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            tid = await new_thread(c)
            rid, ts = new_id(), now_ms()
            running = RunRecord(rid, tid, "agent", RunStatus.RUNNING, ts, ts, 1, "w-elsewhere")
            await RunStore(redis, keys, ttl_seconds=60).create(running)
            ctl = redis.pubsub(ignore_subscribe_messages=True)
            await ctl.subscribe(keys.ctl("w-elsewhere"))
            before = await run_reads()
            stop = asyncio.create_task(c.post(f"/threads/{tid}/runs/{rid}/cancel?wait=1"))
            async for _ in ctl.listen():  # the worker was asked: the API waits for the end
                break
            await ctl.aclose()
            for i in range(BATCHES):  # the run goes on a little before its worker stops it
                await log.append(rid, [Event("custom", b"%d" % i)])
            await log.append(rid, [Event(END_EVENT, b"")], status=RunStatus.INTERRUPTED)
            r = await stop
            reads = await run_reads() - before
    finally:
        await redis.aclose()
        server.stop()
    assert r.status_code == 200
    assert r.json()["status"] == "interrupted"
    # The thread and the run to authorize it, the run with the request, the run at its end:
    # 4, not one per batch. A subscribe confirmed late or a pub/sub reconnect on a loaded
    # machine sends the waiter back to the run once more each, so allow a few of those.
    assert 4 <= reads <= 8, f"{reads} reads of the thread and run for {BATCHES} batches"


@pytest.mark.redis("standalone")
async def test_a_cancel_while_the_attempt_is_set_up_ends_the_run(
    redis_server: RedisServer,
) -> None:
    """A cancel that reaches the worker after it took the run but before the graph started
    (a creator hanging up at once does this) ends the run as interrupted, not leaves it running
    until its lease lapses."""
    relay = Tokenrelay(make_settings(redis_server, lease_seconds=60.0)).start()
    assert relay.worker is not None
    worker = relay.worker
    entered, release = threading.Event(), threading.Event()
    number = worker._number

    async def slow_number(job: Job, after: int) -> dict[bytes, bytes]:
        # The attempt has begun; the run is numbered and announced once released.
        entered.set()
        while not release.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return await number(job, after)

    worker._number = slow_number  # type: ignore[method-assign]
    try:
        async with httpx.AsyncClient(base_url=relay.url, timeout=30) as c:
            tid = await new_thread(c)
            rid = (await c.post(f"/threads/{tid}/runs", json=run_body("twostep"))).json()["run_id"]
            while not entered.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            r = await c.post(f"/threads/{tid}/runs/{rid}/cancel")
            assert r.status_code in (200, 202, 204), r.text
            running = worker._running.get(rid)
            while running is not None and not running.stop_reason:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            release.set()
            await wait_status(c, tid, rid, "interrupted")
            assert (await c.get(f"/threads/{tid}")).json()["status"] == "idle"
    finally:
        release.set()
        relay.stop()


@pytest.mark.redis("standalone")
@pytest.mark.parametrize("early_check", ["answered", "failed", "stale"])
async def test_a_cancelled_runs_ownership_is_checked_while_langgraph_unwinds(
    redis_server: RedisServer, early_check: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fenced check that the cancelled attempt still owns its run (before it writes the
    thread) is sent as the cancel is delivered, not after the graph has unwound: the partial
    is saved without waiting for another round trip. If that early check failed, or its answer
    is older than the worker trusts one, a check is made when it is needed, and the run ends
    interrupted with its partial all the same."""
    early_check_fails = early_check == "failed"
    if early_check == "stale":
        monkeypatch.setattr(worker_module, "OWNERSHIP_FRESH_SECONDS", 0.0)
    relay = Tokenrelay(make_settings(redis_server)).start()
    assert relay.worker is not None
    worker = relay.worker
    calls: list[tuple[str, bool]] = []  # (run id, whether the unwound run had been taken up)
    taken_up: set[str] = set()
    update_fenced, cancelled = worker.runs.update_fenced, worker._cancelled

    async def recording_update(run_id: str, attempt: int, **fields: str | int) -> bool:
        if "error" not in fields:
            calls.append((run_id, run_id in taken_up))
            if early_check_fails and len(calls) == 1:
                raise ConnectionError("lost on the way")
        return await update_fenced(run_id, attempt, **fields)

    async def recording_cancelled(msg_id: bytes, job: Job, *args: Any) -> None:
        taken_up.add(job.run_id)
        await cancelled(msg_id, job, *args)

    worker.runs.update_fenced = recording_update  # type: ignore[method-assign]
    worker._cancelled = recording_cancelled  # type: ignore[method-assign]
    try:
        async with httpx.AsyncClient(base_url=relay.url, timeout=30) as c:
            tid = await new_thread(c)
            async with c.stream("POST", f"/threads/{tid}/runs/stream", json=run_body("slow")) as r:
                head = await until_messages(r, 5)
                rid = head[0].json()["run_id"]
                done = await c.post(f"/threads/{tid}/runs/{rid}/cancel", params={"wait": 1})
                evts = head + await events(r)
            assert done.json()["status"] == "interrupted"
            state = (await c.get(f"/threads/{tid}/state")).json()
            assert state["values"]["messages"][-1]["content"] == chunks_text(evts)
    finally:
        relay.stop()
    if early_check == "answered":
        assert calls == [(rid, False)]
    else:
        assert calls == [(rid, False), (rid, True)]


async def test_a_cancel_after_the_reply_completed_leaves_the_reply_as_it_is(
    client: httpx.AsyncClient,
) -> None:
    # The reply streamed and its node completed; the run is cancelled in the next node, which
    # streams nothing. Nothing was cut short: the thread keeps the reply as its node wrote it.
    tid = await new_thread(client)
    async with client.stream(
        "POST", f"/threads/{tid}/runs/stream", json=run_body("afterword")
    ) as r:
        head: list[SSE] = []
        while not any(e.event == "updates" and "llm" in e.json() for e in head):
            head += await events(r, limit=1)
        run_id = head[0].json()["run_id"]
        cancelled = await client.post(f"/threads/{tid}/runs/{run_id}/cancel", params={"wait": 1})
        evts = head + await events(r)
    assert cancelled.json()["status"] == "interrupted"
    reply = chunks_text(evts)
    messages = (await client.get(f"/threads/{tid}/state")).json()["values"]["messages"]
    assert [m["type"] for m in messages] == ["human", "ai"]
    assert messages[-1]["content"] == reply
    assert "cancelled" not in messages[-1]["response_metadata"]
