"""Start each benchmarked system in processes of its own, each on a fresh redis-server."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import psutil

from bench import agentserver
from tokenrelay.broker.embedded import EmbeddedRedis, free_port

PEERS = Path(__file__).parent / "peers"
GRAPHS = {
    "agent": "tokenrelay.producer.demo:graph",
    "paced": "bench.graphs:paced",
    "paced-writer": "bench.graphs:paced_writer",
}
NODE_PEER = PEERS / "resumable-stream"

SYSTEMS = (
    "tokenrelay",
    "tokenrelay-writer",
    "tokenrelay-protocol",
    "resumable-stream",
    "resumable-stream-resumed",
    "naive",
    "raw",
    "tokenrelay-dev",
    "langgraph-dev",
)
DESCRIPTIONS = {
    "tokenrelay": "tokenrelay: one API process, one worker process running a LangGraph chat "
    "graph (messages-tuple), Redis",
    "tokenrelay-writer": "tokenrelay, the tokens emitted by a graph node's stream writer "
    "(custom mode) instead of a chat model",
    "tokenrelay-protocol": "tokenrelay, the same chat graph read through the agent streaming "
    "protocol of useStream v1 (POST /threads/{tid}/stream/events, then run.start)",
    "resumable-stream": "Vercel resumable-stream 2.2.13 on Node, same Redis (bench/peers); "
    "the reader is the request that creates the stream",
    "resumable-stream-resumed": "the same, every reader joining a stream produced in the "
    "background (resumeExistingStream), as after a refresh",
    "naive": "FastAPI StreamingResponse, one XREAD BLOCK per client, XADD per token",
    "raw": "uvicorn streaming events generated in-process, no Redis (the ceiling)",
    "tokenrelay-dev": "`tokenrelay dev` as a new user runs it (default settings, its own "
    "embedded Redis and SQLite checkpointer), serving the demo chat graph",
    "langgraph-dev": "the official `langgraph dev` (langgraph-cli[inmem], in its own virtualenv), "
    "serving the same demo chat graph, --n-jobs-per-worker = the run count",
}
DEMO_WORDS, DEMO_DELAY_MS = 200, 20
"""The demo chat graph's defaults, which both `dev` systems serve unchanged."""


@dataclass
class Running:
    """A started system: where to reach it and which processes to measure."""

    name: str
    url: str
    redis: EmbeddedRedis | None
    server: psutil.Process
    """The process that serves readers (its RSS and CPU are the API's figures)."""
    others: dict[str, psutil.Process] = field(default_factory=dict)

    logs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def log_tail(self) -> str:
        """The end of each server process's stderr, for a failed scenario's report."""
        return "\n".join(f"{p.args}: {_stderr(p)[-600:]}" for p in self.logs)

    def processes(self) -> dict[str, list[psutil.Process]]:
        """Every process of the system by role, children included: `api` serves the readers
        (the Node server for resumable-stream, the whole server for langgraph-dev), `worker`
        produces, `redis`; `tokenrelay dev`'s own processes are sorted into the same roles,
        its supervisor under `dev`."""
        roots = {"api": self.server, **self.others}
        if self.redis is not None:
            assert self.redis.pid is not None
            roots["redis"] = psutil.Process(self.redis.pid)
        out: dict[str, list[psutil.Process]] = {}
        for role, root in roots.items():
            with contextlib.suppress(psutil.NoSuchProcess):
                children = root.children(recursive=True)
                if self.name == "tokenrelay-dev":
                    out["dev"] = [root]
                    for child in children:
                        out.setdefault(_dev_role(child), []).append(child)
                else:
                    out[role] = [root, *children]
        return out

    def redis_calls(self) -> int:
        """Commands Redis has executed (INFO commandstats, summed)."""
        if self.redis is None:
            return 0
        import redis

        client = redis.Redis.from_url(self.redis.url)
        try:
            stats = client.info("commandstats")
        finally:
            client.close()
        return sum(int(v["calls"]) for v in stats.values())


def _dev_role(proc: psutil.Process) -> str:
    """Which of `tokenrelay dev`'s roles a child process plays, from its command line."""
    try:
        args = proc.cmdline()
    except psutil.NoSuchProcess:
        return "dev"
    if args and "redis" in Path(args[0]).name:
        return "redis"
    for role in ("api", "worker"):
        if role in args:
            return role
    return "dev"


def available(name: str) -> str | None:
    """Why `name` cannot run here, or None."""
    if name.startswith("resumable-stream") and shutil.which("node") is None:
        return "node is not installed"
    if name == "langgraph-dev":
        return agentserver.ensure_venv()
    return None


def _spawn(
    args: list[str], env: dict[str, str], cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    # stderr goes to a file: a pipe nobody reads would stall a chatty server.
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed when the system stops)
    proc = subprocess.Popen(
        args, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
    )  # fmt: skip
    _logs[proc.pid] = log
    return proc


_logs: dict[int, IO[bytes]] = {}


def _stderr(proc: subprocess.Popen[bytes]) -> str:
    log = _logs[proc.pid]
    log.seek(0)
    return log.read().decode(errors="replace")[-2000:]


def _wait_ready(url: str, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited {proc.returncode}: {_stderr(proc)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become ready")


def _node_modules() -> None:
    if not (NODE_PEER / "node_modules").exists():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=NODE_PEER, check=True
        )


@contextlib.contextmanager
def start(name: str, jobs: int = 100) -> Iterator[Running]:
    """Run system `name` until the block ends (`jobs`: langgraph-dev's runs at once)."""
    dev = name.endswith("-dev")
    redis = EmbeddedRedis().start() if name != "raw" and not dev else None
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
    py = sys.executable
    procs: list[subprocess.Popen[bytes]] = []
    workdir = tempfile.TemporaryDirectory()
    try:
        if name == "tokenrelay-dev":
            # Its own Redis and checkpointer, as `tokenrelay dev` starts them: all its children.
            env.update(TOKENRELAY_LOG_LEVEL="warning")
            dev = [py, "-m", "tokenrelay.producer.cli", "dev", "--port", str(port)]
            procs.append(_spawn(dev, env, cwd=Path(workdir.name)))
            health = "/ok"
        elif name == "langgraph-dev":
            config = agentserver.project(Path(workdir.name))
            env.update(LANGGRAPH_CLI_NO_ANALYTICS="1", LANGSMITH_TRACING="false",
                       PYTHONPATH=str(PEERS.parent.parent))  # fmt: skip
            procs.append(_spawn(agentserver.command(config, port, jobs), env,
                                cwd=Path(workdir.name)))  # fmt: skip
            health = "/ok"
        elif name.startswith("tokenrelay"):
            assert redis is not None
            env.update(
                TOKENRELAY_REDIS_URL=redis.url,
                TOKENRELAY_GRAPHS=json.dumps(GRAPHS),
                TOKENRELAY_WORKER_CONCURRENCY="4000",
                TOKENRELAY_LOG_LEVEL="warning",
                TOKENRELAY_SHUTDOWN_GRACE_SECONDS="1",
            )
            procs.append(
                _spawn([py, "-m", "tokenrelay.producer.cli", "api", "--port", str(port)], env)
            )
            procs.append(_spawn([py, "-m", "tokenrelay.producer.cli", "worker"], env))
            health = "/readyz"
        elif name.startswith("resumable-stream"):
            assert redis is not None
            _node_modules()
            env.update(PORT=str(port), REDIS_URL=redis.url)
            procs.append(_spawn(["node", "server.mjs"], env, cwd=NODE_PEER))
            health = "/healthz"
        elif name == "naive":
            assert redis is not None
            base = [py, "-m", "bench.peers.naive"]
            procs.append(_spawn([*base, "api", "--port", str(port), "--redis", redis.url], env))
            procs.append(_spawn([*base, "producer", "--redis", redis.url], env))
            health = "/healthz"
        elif name == "raw":
            procs.append(_spawn([py, "-m", "bench.peers.raw", "--port", str(port)], env))
            health = "/healthz"
        else:
            raise ValueError(f"unknown system {name!r}")
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url + health, procs)
        others = {"worker": psutil.Process(procs[1].pid)} if len(procs) > 1 else {}
        yield Running(name, url, redis, psutil.Process(procs[0].pid), others, procs)
    finally:
        # The `dev` commands start processes of their own; none may outlive the system.
        descendants: list[psutil.Process] = []
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                descendants += psutil.Process(proc.pid).children(recursive=True)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            _logs.pop(proc.pid).close()
        _, alive = psutil.wait_procs(descendants, timeout=10)
        for child in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        if redis is not None:
            redis.close()
        workdir.cleanup()
