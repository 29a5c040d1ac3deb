"""Input that used to answer 500 (found by schemathesis and by hand, issue 15) answers a 4xx
naming the problem, or 503 with Retry-After when Redis refuses; nothing internal leaks."""

from __future__ import annotations

import httpx
import pytest
from redis.asyncio import Redis

from tests.conftest import RedisServer, make_settings
from tests.integration.test_stream import new_thread, run_body, stream_run
from tests.server import Tokenrelay
from tokenrelay.broker.embedded import EmbeddedRedis


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        ({"values": {}, "as_node": "nope"}, "Node nope does not exist"),
        ({"values": {}, "as_node": ""}, "Node  does not exist"),
        ({"values": [{}]}, "Expected dict"),
        ({"values": {"messages": [{"role": "bogus"}]}}, "must contain 'role' and 'content'"),
    ],
)
async def test_bad_state_update_is_422(
    client: httpx.AsyncClient, update: dict[str, object], reason: str
) -> None:
    tid = await new_thread(client)
    r = await client.post(f"/threads/{tid}/state", json=update)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("Invalid state update: ")
    assert reason in r.json()["detail"]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"metadata": {"a": "\\ud800"}}',
        b'{"metadata": {"a": "\\udc00x"}}',
        b'{"metadata": {"a": NaN}}',
        b'{"metadata": {"a": "\xff"}}',
    ],
)
async def test_json_that_is_not_rfc_8259_is_422_everywhere(
    client: httpx.AsyncClient, raw: bytes
) -> None:
    # One rule for every endpoint that takes JSON: the body is UTF-8 JSON text, no lone
    # surrogate (which no encoder can write back), no NaN.
    headers = {"Content-Type": "application/json"}
    r = await client.post("/threads", content=raw, headers=headers)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("Request body is not valid JSON: ")
    tid = await new_thread(client)
    body = b'{"assistant_id": "fast", "input": {"messages": [{"role": "user", "content": '
    body += b'"\\ud800"}]}}'
    for path in (f"/threads/{tid}/runs/stream", f"/threads/{tid}/runs", "/runs/wait"):
        r = await client.post(path, content=body, headers=headers)
        assert r.status_code == 422, (path, r.text)
    r = await client.get(f"/threads/{tid}/runs")
    assert r.json() == []  # nothing was started


async def test_422_names_the_problem_without_echoing_the_body(client: httpx.AsyncClient) -> None:
    huge = "x" * 500_000
    r = await client.post("/threads", json={"metadata": huge})
    assert r.status_code == 422
    assert len(r.content) < 2_000
    assert r.json()["detail"][0]["loc"] == ["body", "metadata"]
    r = await client.post("/threads", json={"thread_id": huge})
    assert r.status_code == 422 and len(r.content) < 2_000


@pytest.mark.parametrize(
    "bad",
    ["a\nb", "a\rb", "a\x00b", "a\x7fb", "a\u2028b", ".", "..", "a/b", "a{b}", "a:b", "x" * 129],
)
async def test_one_id_rule_for_thread_and_chat_ids(client: httpx.AsyncClient, bad: str) -> None:
    r = await client.post("/threads", json={"thread_id": bad})
    assert r.status_code == 422, r.text
    assert "control character" in r.json()["detail"][0]["msg"]
    parts = [{"type": "text", "text": "hi"}]
    chat = {"id": bad, "messages": [{"id": "m", "role": "user", "parts": parts}]}
    r = await client.post("/ai/chat", json=chat)
    assert r.status_code == 422, r.text


@pytest.mark.parametrize("bad", ["a\nb", "x" * 10_000, "a:b", "a\u2028b"])
async def test_a_thread_created_on_run_obeys_the_id_rule(
    client: httpx.AsyncClient, bad: str
) -> None:
    path = httpx.URL("/").copy_with(raw_path=b"/threads/" + _quote(bad) + b"/runs/stream")
    r = await client.post(path, json={**run_body(), "if_not_exists": "create"})
    assert r.status_code == 422, r.text
    assert "thread_id must be 1 to 128 characters" in r.json()["detail"]
    # The agent-protocol endpoints apply the same rule.
    cmd = {"id": 1, "method": "run.start", "params": {"assistant_id": "fast"}}
    path = httpx.URL("/").copy_with(raw_path=b"/threads/" + _quote(bad) + b"/commands")
    r = await client.post(path, json=cmd)
    assert r.status_code == 400 and r.json()["error"] == "invalid_argument"


def _quote(value: str) -> bytes:
    from urllib.parse import quote

    return quote(value, safe="").encode()


async def test_an_id_with_spaces_and_non_ascii_resumes_through_its_location(
    client: httpx.AsyncClient,
) -> None:
    tid = "café au lait 1"
    path = httpx.URL("/").copy_with(raw_path=b"/threads/" + _quote(tid) + b"/runs/stream")
    async with client.stream("POST", path, json={**run_body(), "if_not_exists": "create"}) as r:
        assert r.status_code == 200
        await r.aread()
    location = r.headers["location"]
    assert location.startswith("/threads/caf%C3%A9%20au%20lait%201/runs/")
    again = await client.get(location, headers={"Last-Event-ID": "-1"})
    assert again.status_code == 200 and "event: metadata" in again.text
    assert (await client.get(f"/threads/{_quote(tid).decode()}")).json()["thread_id"] == tid


async def test_literal_thread_paths_win_over_a_thread_id(client: httpx.AsyncClient) -> None:
    for path in ("/threads/search", "/threads/count", "/threads/t/state/checkpoint"):
        r = await client.request("OPTIONS", path)
        assert r.status_code == 405 and r.headers["allow"] == "POST", path
    # Every method of a path, not only those of its first route.
    r = await client.request("OPTIONS", "/threads/t")
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, PATCH"
    r = await client.request("PUT", "/threads/t/state")
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"


async def test_redis_refusing_writes_is_503_and_readyz_names_no_host(
    own_redis: EmbeddedRedis,
) -> None:
    server = Tokenrelay(make_settings(own_redis)).start()
    redis = Redis.from_url(own_redis.url)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            tid = await new_thread(c)
            await redis.config_set("maxmemory-policy", "noeviction")
            await redis.config_set("maxmemory", "1")
            try:
                r = await c.post("/threads", json={})
                assert r.status_code == 503, r.text
                assert r.headers["retry-after"] == "1"
                assert "out of memory" in r.json()["detail"]
                r = await c.post(f"/threads/{tid}/runs", json=run_body())
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
            finally:
                await redis.config_set("maxmemory", "0")
            assert (await c.post("/threads", json={})).status_code == 200
            own_redis.kill()
            r = await c.get("/readyz")
            assert r.status_code == 503
            detail = "redis is unreachable or not serving"
            assert r.json() == {"status": "unavailable", "detail": detail}
            assert str(own_redis.port) not in r.text
    finally:
        await redis.aclose()
        server.stop()


async def test_postgres_history_filter_with_nul_is_422(
    redis_server: RedisServer, postgres_url: str
) -> None:
    server = Tokenrelay(make_settings(redis_server, checkpointer=postgres_url)).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            tid = await new_thread(c)
            await stream_run(c, tid, run_body())
            r = await c.post(f"/threads/{tid}/history", json={"metadata": {"a": "\u0000"}})
            assert r.status_code == 422, r.text
            assert r.json()["detail"].startswith("Invalid history query: ")
            r = await c.post(f"/threads/{tid}/history", json={"metadata": {"a": "b"}})
            assert r.status_code == 200 and r.json() == []
    finally:
        server.stop()


async def test_wildcard_cors_never_allows_credentials(redis_server: RedisServer) -> None:
    server = Tokenrelay(make_settings(redis_server, cors_origins=["*"]), with_worker=False)
    server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            headers = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
            r = await c.request("OPTIONS", "/threads", headers=headers)
            assert r.status_code == 200
            assert r.headers["access-control-allow-origin"] == "*"
            assert "access-control-allow-credentials" not in r.headers
    finally:
        server.stop()


async def test_a_state_update_from_a_checkpoint_id_alone(client: httpx.AsyncClient) -> None:
    # Found by schemathesis: a checkpoint id without its namespace was a KeyError (500) in the
    # in-memory checkpointer; the root namespace is meant.
    tid = await new_thread(client)
    await stream_run(client, tid, run_body())
    first = (await client.get(f"/threads/{tid}/state")).json()["checkpoint_id"]
    r = await client.post(
        f"/threads/{tid}/state", json={"values": {"messages": []}, "checkpoint_id": first}
    )
    assert r.status_code == 200, r.text
    assert r.json()["checkpoint"]["checkpoint_ns"] == ""
