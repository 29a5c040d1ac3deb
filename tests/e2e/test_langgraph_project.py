"""A LangGraph project switched from `langgraph dev` to `tokenrelay dev` by changing the command:
its `langgraph.json` (a graph in a local package, an env file, custom auth, a custom app) is read
from the working directory, and its `langgraph_sdk.Auth` object gives each user their own threads
on every protocol, with the official SDKs, over real HTTP and a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from langgraph_sdk import get_client
from langgraph_sdk.errors import NotFoundError, PermissionDeniedError

from tests.conftest import RedisServer
from tests.e2e.test_js_clients import run_node_tests
from tests.sse import SSE, events, parse_block
from tokenrelay.broker.embedded import free_port

REPO = Path(__file__).resolve().parents[2]
ALICE, BOB = "token-alice", "token-bob"

AUTH_PY = """
from langgraph_sdk import Auth

auth = Auth()
USERS = {
    "token-alice": {"identity": "alice", "permissions": ["chat", "delete"]},
    "token-bob": {"identity": "bob", "permissions": ["chat"]},
}


@auth.authenticate
async def authenticate(authorization: str | None, path: str, method: str):
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or token not in USERS:
        raise Auth.exceptions.HTTPException(status_code=401, detail="unknown bearer token")
    return USERS[token]


@auth.on
async def owner_only(ctx: Auth.types.AuthContext, value: dict):
    filters = {"owner": ctx.user.identity}
    value.setdefault("metadata", {}).update(filters)
    return filters


@auth.on.threads.delete
async def deleters_only(ctx: Auth.types.AuthContext, value: dict):
    if "delete" not in ctx.permissions:
        return False
    return {"owner": ctx.user.identity}


@auth.on.assistants
async def anyone(ctx: Auth.types.AuthContext, value: dict):
    return True
"""

GRAPH_PY = """
import os

from tokenrelay.producer.demo import FakeStreamingChatModel, chat_graph

GREETING = os.environ["SUPPORT_BOT_GREETING"]  # from the project's env file
graph = chat_graph(FakeStreamingChatModel())
"""

WEBAPP_PY = """
import os

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route


async def greeting(request):
    return JSONResponse({"greeting": os.environ["SUPPORT_BOT_GREETING"]})


app = Starlette(routes=[Route("/project/greeting", greeting)])
"""

LANGGRAPH_JSON = {
    "dependencies": ["./packages/support_bot"],
    "graphs": {"agent": "support_bot.graph:graph"},
    "env": ".env",
    "auth": {"path": "./auth.py:auth"},
    "http": {"app": "./webapp.py:app", "enable_custom_route_auth": True},
    "python_version": "3.11",
}

ENV_FILE = """# the project's secrets and settings
SUPPORT_BOT_GREETING="hello from the env file"
export TOKENRELAY_DEMO_REPLY_WORDS=300
TOKENRELAY_DEMO_TOKEN_DELAY_MS=10
"""


def write_project(root: Path) -> None:
    pkg = root / "packages" / "support_bot" / "support_bot"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "graph.py").write_text(GRAPH_PY)
    (root / "auth.py").write_text(AUTH_PY)
    (root / "webapp.py").write_text(WEBAPP_PY)
    (root / ".env").write_text(ENV_FILE)
    (root / "langgraph.json").write_text(json.dumps(LANGGRAPH_JSON, indent=2))


@dataclass
class Dev:
    url: str
    log: Path


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    """`tokenrelay dev --port <free>` run from the project's folder, as `langgraph dev` is."""
    root = tmp_path_factory.mktemp("project")
    write_project(root)
    log = root / "dev.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tokenrelay.producer.cli", "dev", "--port", str(port)],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"tokenrelay dev did not start:\n{log.read_text()}")
            try:
                if httpx.get(url + "/ok", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield Dev(url, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def sdk(dev: Dev, token: str) -> Any:
    return get_client(url=dev.url, headers={"Authorization": f"Bearer {token}"})


@contextlib.asynccontextmanager
async def plain(dev: Dev) -> AsyncIterator[httpx.AsyncClient]:
    """A client with no credentials at all, as a browser's EventSource."""
    async with httpx.AsyncClient(base_url=dev.url, timeout=30) as c:
        yield c


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def say(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


async def test_the_project_is_read_from_its_folder(project: Dev) -> None:
    out = project.log.read_text()
    assert "not supported by tokenrelay, ignored: python_version" in out
    async with plain(project) as c:
        # Probes and metrics stay open; everything else needs a known bearer token.
        for path in ("/ok", "/healthz", "/readyz", "/metrics"):
            assert (await c.get(path)).status_code == 200, path
        r = await c.post("/threads", json={})
        assert (r.status_code, r.json()) == (401, {"detail": "unknown bearer token"})
        r = await c.post("/threads", json={}, headers=auth("token-mallory"))
        assert (r.status_code, r.json()) == (401, {"detail": "unknown bearer token"})
        # http.app is mounted beside the API, behind the same auth; the env file reached it.
        assert (await c.get("/project/greeting")).status_code == 401
        r = await c.get("/project/greeting", headers=auth(ALICE))
        assert r.json() == {"greeting": "hello from the env file"}
        # The graph comes from the local package listed in `dependencies`.
        r = await c.post("/assistants/search", json={}, headers=auth(ALICE))
        assert [a["graph_id"] for a in r.json()] == ["agent"]


async def test_each_user_sees_streams_joins_and_cancels_only_their_own_threads(
    project: Dev,
) -> None:
    alice, bob = sdk(project, ALICE), sdk(project, BOB)
    mine = await alice.threads.create(metadata={"topic": "billing"})
    tid = mine["thread_id"]
    assert mine["metadata"] == {"topic": "billing", "owner": "alice"}
    theirs = await bob.threads.create()
    assert theirs["metadata"] == {"owner": "bob"}

    assert [t["thread_id"] for t in await alice.threads.search(limit=100)] == [tid]
    assert [t["thread_id"] for t in await bob.threads.search(limit=100)] == [theirs["thread_id"]]
    assert await bob.threads.count() == 1

    # A streamed run on alice's thread, as the SDK streams it.
    parts = [
        p
        async for p in alice.runs.stream(
            tid, "agent", input=say("hi"), stream_mode=["messages-tuple", "values"],
            stream_resumable=True,
        )
    ]  # fmt: skip
    assert parts[0].event == "metadata"
    run_id = parts[0].data["run_id"]
    text = "".join(p.data[0]["content"] for p in parts if p.event == "messages")
    assert len(text.split()) == 300
    assert parts[-1].event == "values"
    assert parts[-1].data["messages"][-1]["content"] == text
    run = await alice.runs.get(tid, run_id)
    assert (run["status"], run["metadata"]) == ("success", {"owner": "alice"})

    # To bob, alice's thread and its run do not exist, on every classic endpoint.
    for attempt in (
        bob.threads.get(tid),
        bob.threads.get_state(tid),
        bob.threads.get_history(tid),
        bob.threads.update(tid, metadata={"owner": "bob"}),
        bob.runs.list(tid),
        bob.runs.get(tid, run_id),
        bob.runs.join(tid, run_id),
        bob.runs.cancel(tid, run_id),
        bob.runs.create(tid, "agent", input=say("mine now")),
    ):
        with pytest.raises(httpx.HTTPStatusError) as refused:
            await attempt
        assert refused.value.response.status_code == 404
    for stream in (
        bob.runs.join_stream(tid, run_id, last_event_id="-1"),
        bob.runs.stream(tid, "agent", input=say("mine now")),
    ):
        with pytest.raises(httpx.HTTPStatusError) as refused:
            async for _ in stream:
                pass
        assert refused.value.response.status_code == 404
    # A handler that returns False is a 403: bob may not delete even his own threads.
    with pytest.raises(PermissionDeniedError):
        await bob.threads.delete(theirs["thread_id"])
    assert (await alice.threads.get(tid))["metadata"]["owner"] == "alice"

    # A background run: alice joins its stream and cancels it; bob can do neither.
    run = await alice.runs.create(
        tid, "agent", input=say("a long one"), stream_mode=["messages-tuple", "values"]
    )
    async with httpx.AsyncClient(base_url=project.url, timeout=30) as c:
        r = await c.post("/runs/cancel", json={"thread_id": tid}, headers=auth(BOB))
        assert r.status_code == 404
        r = await c.get(f"/threads/{tid}/stream", headers=auth(BOB))
        assert r.status_code == 404
    seen = 0
    async for part in alice.runs.join_stream(tid, run["run_id"], last_event_id="-1"):
        seen += part.event == "messages"
        if seen == 3:
            break
    ended = await alice.runs.cancel(tid, run["run_id"], wait=True)
    assert ended["status"] == "interrupted"
    state = await alice.threads.get_state(tid)
    assert [m["type"] for m in state["values"]["messages"]] == ["human", "ai"] * 2

    await alice.threads.delete(tid)
    with pytest.raises(NotFoundError):
        await alice.threads.get(tid)


async def test_other_protocols_are_scoped_too(project: Dev) -> None:
    alice = sdk(project, ALICE)
    tid = (await alice.threads.create())["thread_id"]
    async with httpx.AsyncClient(base_url=project.url, timeout=30) as c:
        # AI SDK: alice's chat is hers; to bob it is a chat with nothing to resume or stop.
        chat = {
            "id": tid,
            "messages": [{"role": "user", "parts": [{"type": "text", "text": "hi"}]}],
        }
        async with c.stream("POST", "/ai/chat", json=chat, headers=auth(ALICE)) as r:
            assert r.status_code == 200
            first = [line async for line in r.aiter_lines() if line.startswith("data: ")][:1]
        assert json.loads(first[0][6:])["type"] == "start"
        r = await c.post("/ai/chat", json=chat, headers=auth(BOB))
        assert r.status_code == 404
        assert (await c.get(f"/ai/chat/{tid}/stream", headers=auth(BOB))).status_code == 204
        r = await c.post(f"/ai/chat/{tid}/stop", headers=auth(BOB))
        assert r.json() == {"stopped": None}

        # The agent streaming protocol: commands and the event stream.
        cmd = {"id": 1, "method": "state.get", "params": {}}
        r = await c.post(f"/threads/{tid}/commands", json=cmd, headers=auth(ALICE))
        assert r.json()["type"] == "success"
        r = await c.post(f"/threads/{tid}/commands", json=cmd, headers=auth(BOB))
        assert r.status_code == 404
        r = await c.post(f"/threads/{tid}/stream/events", json={}, headers=auth(BOB))
        assert r.status_code == 404
        # A protocol run on a new thread id makes the thread the starter's.
        new = f"{tid}-protocol"
        start = {"id": 2, "method": "run.start", "params": {"assistant_id": "agent",
                 "input": say("hi")}}  # fmt: skip
        r = await c.post(f"/threads/{new}/commands", json=start, headers=auth(BOB))
        assert r.json()["type"] == "success"
        r = await c.get(f"/threads/{new}", headers=auth(BOB))
        assert r.json()["metadata"]["owner"] == "bob"
        assert (await c.get(f"/threads/{new}", headers=auth(ALICE))).status_code == 404

    # The protocol's WebSocket: authenticated at the handshake, someone else's thread refused.
    ws_url = project.url.replace("http://", "ws://") + f"/threads/{tid}/stream/events"
    for headers, status in (({}, 401), (auth(BOB), 404)):
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(ws_url, additional_headers=headers):
                pass
        assert refused.value.response.status_code == status
    async with websockets.connect(ws_url, additional_headers=auth(ALICE)) as ws:
        await ws.send(json.dumps(cmd))
        assert json.loads(await ws.recv())["type"] == "success"


async def test_a_stream_token_lets_a_plain_sse_reader_resume_until_it_expires(
    project: Dev,
) -> None:
    alice = sdk(project, ALICE)
    tid = (await alice.threads.create())["thread_id"]
    other = (await alice.threads.create())["thread_id"]
    run = await alice.runs.create(
        tid, "agent", input=say("hi"), stream_mode=["messages-tuple", "values"],
        stream_resumable=True,
    )  # fmt: skip
    rid = run["run_id"]
    async with httpx.AsyncClient(base_url=project.url, timeout=30) as c:
        r = await c.post(f"/threads/{tid}/stream_token", json={"run_id": rid}, headers=auth(BOB))
        assert r.status_code == 404
        r = await c.post(f"/threads/{tid}/stream_token", json={"run_id": rid}, headers=auth(ALICE))
        grant = r.json()
        assert (grant["thread_id"], grant["run_id"]) == (tid, rid)
        token = grant["token"]

    async with plain(project) as browser:
        # The run's stream from the start, with no header but the token in the query string.
        url = f"/threads/{tid}/runs/{rid}/stream"
        params = {"stream_token": token, "last_event_id": "-1"}
        async with browser.stream("GET", url, params=params) as r:
            assert r.status_code == 200
            got = await events(r)
        assert got[0].event == "metadata"
        assert got[-1].event == "values"
        text = "".join(e.json()[0]["content"] for e in got if e.event == "messages")
        assert len(text.split()) == 300
        # Resumed after an id it saw: exactly what follows.
        params["last_event_id"] = got[9].id or ""
        async with browser.stream("GET", url, params=params) as r:
            assert [e.id for e in await events(r)] == [e.id for e in got[10:]]

        # Only that run's stream: not another thread's, not the API.
        r = await browser.get(f"/threads/{other}/stream", params={"stream_token": token})
        assert r.status_code == 403
        r = await browser.get(f"/threads/{tid}", params={"stream_token": token})
        assert r.status_code == 403
        r = await browser.get(url, params={"stream_token": token[:-2] + "xx"})
        assert r.status_code == 401

    # A thread-wide token with a one-second life: refused once it has expired (until then
    # it joins the idle thread: 204).
    async with httpx.AsyncClient(base_url=project.url, timeout=30) as c:
        r = await c.post(
            f"/threads/{tid}/stream_token", json={"ttl_seconds": 1}, headers=auth(ALICE)
        )
        short = r.json()["token"]
    async with plain(project) as browser:
        for _ in range(300):  # polled until the token's second is over
            r = await browser.get(f"/threads/{tid}/stream", params={"stream_token": short})
            if r.status_code != 204:
                break
            await asyncio.sleep(0.2)
        assert (r.status_code, r.json()) == (401, {"detail": "stream token expired"})


def test_the_js_sdk_with_a_bearer_token(project: Dev) -> None:
    run_node_tests(
        project,  # type: ignore[arg-type]
        "auth.test.js",
        env={"TOKENRELAY_BEARER": ALICE, "TOKENRELAY_BEARER_OTHER": BOB},
    )


def test_api_and_worker_processes_read_the_config_named_by_config(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """`tokenrelay api --workers 2 --config ...` and `tokenrelay worker --config ...` started
    elsewhere: each uvicorn worker loads the project's package and auth, and they share one
    stream token secret; the worker runs what the API stored."""
    root = tmp_path / "project"
    root.mkdir()
    write_project(root)
    config = str(root / "langgraph.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["TOKENRELAY_REDIS_URL"] = redis_server.url
    env["TOKENRELAY_KEY_PREFIX"] = f"t{uuid.uuid4().hex[:8]}"
    env["TOKENRELAY_DEMO_REPLY_WORDS"] = "20"  # wins over the project's env file
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    commands = [
        ["api", "--port", str(port), "--workers", "2", "--config", config],
        ["worker", "--config", config],
    ]
    procs = []
    try:
        for args in commands:
            with (tmp_path / f"{args[0]}.log").open("ab") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "tokenrelay.producer.cli", *args],
                    cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                ))  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, (tmp_path / "api.log").read_text()
            try:
                if httpx.get(url + "/ok", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        with httpx.Client(base_url=url, timeout=30, headers=auth(ALICE)) as c:
            tid = c.post("/threads", json={}).json()["thread_id"]
            body = {"assistant_id": "agent", "input": say("hi"), "stream_mode": "messages-tuple"}
            with c.stream("POST", f"/threads/{tid}/runs/stream", json=body) as r:
                text = r.read().decode()
            blocks = [parse_block(b) for b in text.split("\n\n")]
            chunks = [b.json()[0] for b in blocks if isinstance(b, SSE) and b.event == "messages"]
            assert len("".join(c["content"] for c in chunks).split()) == 20
            token = c.post(f"/threads/{tid}/stream_token").json()["token"]
            assert c.get(f"/threads/{tid}", headers=auth(BOB)).status_code == 404
        # Whichever API process a request reaches accepts the token.
        for _ in range(6):
            r = httpx.get(f"{url}/threads/{tid}/stream", params={"stream_token": token})
            assert r.status_code == 204
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_a_wrong_auth_path_stops_the_api_at_start_naming_it(tmp_path: Path) -> None:
    (tmp_path / "langgraph.json").write_text(
        json.dumps(
            {"graphs": {"agent": "tokenrelay.producer.demo:graph"}, "auth": {"path": "./a.py:auth"}}
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "tokenrelay.producer.cli", "api", "--port", str(free_port())],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert f"auth path '{tmp_path / 'a.py'}:auth': cannot import" in done.stderr
