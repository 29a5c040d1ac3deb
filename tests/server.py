"""A real tokenrelay (API under uvicorn + worker) on a loopback port, in its own thread and loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import uvicorn

from tokenrelay.api.app import create_app
from tokenrelay.api.serving import uvicorn_options
from tokenrelay.broker.connection import RedisClient, connect
from tokenrelay.broker.embedded import free_port
from tokenrelay.broker.graphs import GraphRegistry, open_checkpointer
from tokenrelay.broker.settings import Settings
from tokenrelay.producer.worker import Worker


class Tokenrelay:
    """API and worker sharing one process, as `tokenrelay dev` runs them."""

    def __init__(self, settings: Settings, *, with_worker: bool = True) -> None:
        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._with_worker = with_worker
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._server: uvicorn.Server | None = None
        self.worker: Worker | None = None
        self._error: BaseException | None = None

    def start(self) -> Tokenrelay:
        self._thread.start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()  # a failed start leaves nothing running
            raise
        return self

    @property
    def thread_ident(self) -> int:
        """The id of the thread the server (and its worker) runs on."""
        assert self._thread.ident is not None
        return self._thread.ident

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._error is not None:
                raise self._error
            try:
                if httpx.get(self.url + "/ok", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("tokenrelay did not start")

    def connections(self) -> set[object]:
        """The connections the server holds open (its protocol objects), copied."""
        assert self._server is not None
        return set(self._server.server_state.connections)

    def stop(self) -> None:
        """Stop the server and its worker; safe to call whether or not start() ran or
        succeeded."""
        if self._loop is not None and self._server is not None:
            self._server.should_exit = True
            if self._stop is not None:
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread.ident is not None:
            self._thread.join(timeout=15)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # surfaced by start()
            self._error = exc

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        s = self.settings
        redis = connect(s.resolved_redis_url(), cluster=s.redis_cluster)
        tasks: list[asyncio.Task[Any]] = []
        saver_cm = open_checkpointer(s.checkpointer)
        saver = await saver_cm.__aenter__()
        if self._with_worker:
            self.worker = Worker(redis, s, GraphRegistry(s.graphs, saver))
            tasks.append(asyncio.create_task(self.worker.serve(self._stop)))
        config = uvicorn.Config(
            create_app(s), host="127.0.0.1", port=self.port, log_level="warning",
            timeout_graceful_shutdown=1, **uvicorn_options(s),
        )  # fmt: skip
        self._server = uvicorn.Server(config)
        try:
            await self._server.serve()
        finally:
            self._stop.set()
            for t in tasks:
                await asyncio.wait_for(t, 10)
            await redis.aclose()
            await saver_cm.__aexit__(None, None, None)


# Every child process a test starts, so that none outlives the session whatever failed between
# its start and its test's clean-up (see `stop_leftover_processes` in conftest.py).
SPAWNED: list[subprocess.Popen[bytes]] = []


class Served(NamedTuple):
    client: httpx.AsyncClient
    redis: RedisClient


@contextlib.asynccontextmanager
async def serving(settings: Settings, *, timeout: float = 30) -> AsyncIterator[Served]:
    """A tokenrelay (API and worker) on `settings`, an HTTP client of it and a Redis client,
    closed and stopped at the end however the block ends."""
    server = Tokenrelay(settings).start()
    redis = connect(settings.resolved_redis_url())
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=timeout) as client:
            yield Served(client, redis)
    finally:
        await redis.aclose()
        server.stop()


def stop_leftovers() -> None:
    """Kill the children started through `WorkerProcess` that are still running."""
    while SPAWNED:
        proc = SPAWNED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class WorkerProcess:
    """`tokenrelay worker` (or, with `command="api"`, `tokenrelay api`) as a child process,
    configured like `settings`."""

    def __init__(
        self, settings: Settings, log_path: Path, *, command: str = "worker", **env: str
    ) -> None:
        self.command = command
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = settings
        self.log_path = log_path
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
        self.env.update(
            TOKENRELAY_REDIS_URL=settings.resolved_redis_url(),
            TOKENRELAY_REDIS_CLUSTER=str(settings.redis_cluster).lower(),
            TOKENRELAY_KEY_PREFIX=settings.key_prefix,
            TOKENRELAY_GRAPHS=json.dumps(settings.graphs),
            TOKENRELAY_CHECKPOINTER=settings.checkpointer,
            TOKENRELAY_LEASE_SECONDS=str(settings.lease_seconds),
            TOKENRELAY_SHUTDOWN_GRACE_SECONDS=str(settings.shutdown_grace_seconds),
            TOKENRELAY_MAX_ATTEMPTS=str(settings.max_attempts),
            TOKENRELAY_HEARTBEAT_SECONDS=str(settings.heartbeat_seconds),
            TOKENRELAY_STREAM_MAXLEN=str(settings.stream_maxlen),
            TOKENRELAY_RETENTION_SECONDS=str(settings.retention_seconds),
        )
        self.env.update(env)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        args = [sys.executable, "-m", "tokenrelay.producer.cli", self.command]
        # One process each: a test signals (pauses, kills) the process it started.
        if self.command == "api":
            args += ["--port", str(self.port), "--workers", "1"]
        else:
            args += ["--processes", "1"]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                args,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parents[1],
            )
        SPAWNED.append(self.proc)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()  # a failed start leaves nothing running
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.command == "worker" and "worker ready" in self.log_path.read_text():
                return
            if self.command == "api" and "Application startup complete" in (
                self.log_path.read_text()
            ):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.command} did not start:\n{self.log_path.read_text()}")

    @property
    def worker_id(self) -> str:
        for line in self.log_path.read_text().splitlines():
            if "worker ready" in line and "worker_id=" in line:
                return line.split("worker_id=")[1].split()[0]
        raise AssertionError("no worker id in the log")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Kill the process if it runs; safe to call whether or not start() ran."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
