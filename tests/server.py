"""A real tokenrelay (API under uvicorn + worker) on a loopback port, in its own thread and loop."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import uvicorn

from api.app import create_app
from broker.connection import connect
from broker.embedded import free_port
from broker.graphs import GraphRegistry, open_checkpointer
from broker.settings import Settings
from producer.worker import Worker


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
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._error is not None:
                raise self._error
            try:
                if httpx.get(self.url + "/ok", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("tokenrelay did not start")

    def stop(self) -> None:
        if self._loop is not None and self._server is not None:
            self._server.should_exit = True
            if self._stop is not None:
                self._loop.call_soon_threadsafe(self._stop.set)
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
        redis = connect(s.resolved_redis_url())
        tasks: list[asyncio.Task[Any]] = []
        saver_cm = open_checkpointer(s.checkpointer)
        saver = await saver_cm.__aenter__()
        if self._with_worker:
            self.worker = Worker(redis, s, GraphRegistry(s.graphs, saver))
            tasks.append(asyncio.create_task(self.worker.serve(self._stop)))
        config = uvicorn.Config(
            create_app(s), host="127.0.0.1", port=self.port, log_level="warning",
            timeout_graceful_shutdown=1,
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
