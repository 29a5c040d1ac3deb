"""Nothing hangs: a cancel of a queued run, a client gone before the first byte, Redis refusing
a run's appends for good, and readiness of a Redis that refuses writes."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import RedisServer, make_settings
from tests.integration.test_stream import new_thread, run_body, wait_status
from tests.server import Tokenrelay, serving
from tests.sse import events
from tokenrelay.broker.connection import connect
from tokenrelay.broker.embedded import EmbeddedRedis
from tokenrelay.broker.keys import Keys
from tokenrelay.broker.models import ZERO_ID

pytestmark = [pytest.mark.timeout(120)]


async def test_cancel_wait_of_a_queued_run_answers_at_once(redis_server: RedisServer) -> None:
    s = make_settings(redis_server)
    api = Tokenrelay(s, with_worker=False).start()  # no worker: the run stays queued
    try:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as c:
            tid = await new_thread(c)
            run = (await c.post(f"/threads/{tid}/runs", json=run_body("slow"))).json()
            r = await c.post(f"/threads/{tid}/runs/{run['run_id']}/cancel", params={"wait": 1})
            assert r.status_code == 200
            assert r.json()["status"] == "interrupted"
            assert (await c.get(f"/threads/{tid}")).json()["status"] == "idle"
            # its stream is ended, and the thread takes a new run
            async with c.stream("GET", f"/threads/{tid}/runs/{run['run_id']}/stream") as j:
                assert await events(j) == []
            follow = await c.post(f"/threads/{tid}/runs", json=run_body("fast"))
            assert follow.status_code == 200
        worker = Tokenrelay(s).start()  # a worker now finds the cancelled job ended
        try:
            async with httpx.AsyncClient(base_url=worker.url, timeout=30) as c:
                await wait_status(c, tid, follow.json()["run_id"], "success")
                got = (await c.get(f"/threads/{tid}/runs/{run['run_id']}")).json()
                assert got["status"] == "interrupted" and got["attempt"] == 0
        finally:
            worker.stop()
    finally:
        api.stop()


@pytest.mark.parametrize("api_keys", [[], ["k1"]])
async def test_creator_gone_before_the_first_byte_cancels(
    redis_server: RedisServer, api_keys: list[str]
) -> None:
    server = Tokenrelay(make_settings(redis_server, api_keys=api_keys)).start()
    headers = {"x-api-key": "k1"} if api_keys else {}
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=headers) as c:
            tid = await new_thread(c)
            # A long run: the hang-up must be noticed while it runs, even on a busy machine.
            body = json.dumps({**run_body("twostep"), "on_disconnect": "cancel"}).encode()
            url = urlsplit(server.url)
            _, writer = await asyncio.open_connection(url.hostname, url.port)
            head = (
                f"POST /threads/{tid}/runs/stream HTTP/1.1\r\nHost: {url.netloc}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                + "\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
            writer.close()  # hang up without reading a byte
            await writer.wait_closed()
            runs: list[dict[str, object]] = []
            while not runs:
                runs = (await c.get(f"/threads/{tid}/runs")).json()
            await wait_status(c, tid, str(runs[0]["run_id"]), "interrupted")
    finally:
        server.stop()


async def test_wrong_type_key_fails_the_run_instead_of_stalling(redis_server: RedisServer) -> None:
    s = make_settings(redis_server)
    async with serving(s) as (c, redis):
        tid = await new_thread(c)
        async with c.stream("POST", f"/threads/{tid}/runs/stream", json=run_body("slow")) as r:
            head = await events(r, limit=3)
            run_id = head[0].json()["run_id"]
            # Something else clobbers the run's blob hash: every append now fails.
            await redis.set(Keys(s.key_prefix).run_blobs(run_id), b"not a hash")
            await wait_status(c, tid, run_id, "error")
        run = (await c.get(f"/threads/{tid}/runs/{run_id}")).json()
        assert "WRONGTYPE" in run["error"] or "AppendFailed" in run["error"]
        assert (await c.get(f"/threads/{tid}")).json()["status"] == "error"
        follow = await c.post(f"/threads/{tid}/runs", json=run_body("fast"))
        assert follow.status_code == 200


async def test_redis_at_maxmemory_fails_the_run_with_an_error_event(
    own_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    s = make_settings(own_redis)
    async with serving(s) as (c, redis):
        assert (await c.get("/readyz")).status_code == 200
        tid = await new_thread(c)
        async with c.stream("POST", f"/threads/{tid}/runs/stream", json=run_body("slow")) as r:
            head = await events(r, limit=3)
            await redis.config_set("maxmemory-policy", "noeviction")
            await redis.config_set("maxmemory", 1)
            ready = await c.get("/readyz")
            assert ready.status_code == 503 and "maxmemory" in ready.json()["detail"]
            # The worker gives the appends up and fails the run; its error and end are
            # written once Redis takes writes again.
            while "could not write the end of the run" not in caplog.text:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            await redis.config_set("maxmemory", 0)
            rest = await events(r)
        evts = head + rest
        assert evts[-1].event == "error"
        assert evts[-1].json()["error"] == "AppendFailed"
        assert (await c.get("/readyz")).status_code == 200
        run_id = head[0].json()["run_id"]
        assert (await c.get(f"/threads/{tid}/runs/{run_id}")).json()["status"] == "error"


async def test_an_exception_in_the_publisher_fails_its_runs_and_it_goes_on(
    redis_server: RedisServer,
) -> None:
    from tokenrelay.broker import codec
    from tokenrelay.broker.errors import AppendFailed
    from tokenrelay.broker.log import EventLog
    from tokenrelay.broker.models import Event
    from tokenrelay.producer.publisher import Publisher

    class Faulty(EventLog):
        """Raises (a bug, say) on its first append of the doomed run."""

        armed = True

        def append_runs_in(self, pipe: Any, appends: Any) -> None:
            if any(a.run_id == "doomed" for a in appends) and self.armed:
                self.armed = False
                raise RuntimeError("a bug")
            super().append_runs_in(pipe, appends)

    s = make_settings(redis_server)
    redis = connect(s.resolved_redis_url())
    log = Faulty(redis, Keys(s.key_prefix), maxlen=100, ttl_seconds=60)
    failed: list[str] = []
    publisher = Publisher(
        redis, log, flush_ms=1, max_events=100, on_failed=lambda rid, _exc: failed.append(rid)
    )
    publisher.start()
    try:
        publisher.begin_run("doomed", attempt=0)
        publisher.emit("doomed", Event("custom", codec.json_bytes({"i": 0})))
        with pytest.raises(AppendFailed):
            await publisher.flush_run("doomed")
        assert failed == ["doomed"]
        # the publisher is still serving other runs
        publisher.begin_run("fine", attempt=0)
        publisher.emit("fine", Event("custom", codec.json_bytes({"i": 1})))
        await publisher.flush_run("fine")
        assert [e.name for e in await log.read("fine", ZERO_ID)] == ["custom"]
    finally:
        await publisher.stop()
        await redis.aclose()


async def test_a_run_redis_refuses_fails_alone_when_it_shares_an_append_call(
    redis_server: RedisServer,
) -> None:
    """One flush appends all its runs in one script call; when Redis refuses one run's part,
    that run fails and the others of the call are written, each exactly once."""
    from tokenrelay.broker import codec
    from tokenrelay.broker.errors import AppendFailed
    from tokenrelay.broker.log import EventLog
    from tokenrelay.broker.models import Event
    from tokenrelay.producer.publisher import Publisher

    s = make_settings(redis_server)
    redis = connect(s.resolved_redis_url())
    keys = Keys(s.key_prefix)
    log = EventLog(redis, keys, maxlen=100, ttl_seconds=60)
    failed: list[str] = []
    publisher = Publisher(
        redis, log, flush_ms=50, max_events=100, on_failed=lambda rid, _exc: failed.append(rid)
    )
    publisher.start()
    runs = ["before", "refused", "after"]
    try:
        await redis.set(keys.run_events("refused"), b"not a stream")
        for i, run_id in enumerate(runs):
            publisher.begin_run(run_id, attempt=0)
            publisher.emit(run_id, Event("custom", codec.json_bytes({"i": i})))
        await publisher.flush_run("before")  # the one flush of all three has ended
        with pytest.raises(AppendFailed):
            await publisher.flush_run("refused")
        await publisher.flush_run("after")
        assert failed == ["refused"]
        for i, run_id in ((0, "before"), (2, "after")):
            entries = await log.read(run_id, ZERO_ID)
            assert [codec.json_loads(e.data) for e in entries] == [{"i": i}]
    finally:
        await publisher.stop()
        await redis.aclose()
