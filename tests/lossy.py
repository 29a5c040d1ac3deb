"""A TCP proxy in front of a real Redis that loses replies on demand: an armed command goes
through and takes effect, then its connection is cut before its reply reaches the client, as
when a network fails or a server stalls at the wrong moment. redis-py sends the command again
on a new connection (its default retry), so the command lands twice."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

from tokenrelay.broker.embedded import free_port

SETTLE_SECONDS = 0.05
"""How long a doomed connection's reply is held back before the cut, so that Redis has applied
every command sent with the armed one (a pipeline)."""


class LossyRedis:
    """The proxy, on its own thread and loop (a test's blocking calls must not stall it)."""

    def __init__(self, upstream_port: int) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self._upstream = upstream_port
        self._armed: dict[bytes, int] = {}
        self._lock = threading.Lock()
        self.lost: list[bytes] = []
        """The patterns whose replies were lost, in order."""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def arm(self, pattern: bytes, times: int = 1) -> None:
        """Lose the reply of the next `times` sends whose bytes hold `pattern`."""
        with self._lock:
            self._armed[pattern] = self._armed.get(pattern, 0) + times

    def armed(self) -> int:
        """Losses still to come."""
        with self._lock:
            return sum(self._armed.values())

    def _doomed(self, data: bytes) -> bytes | None:
        with self._lock:
            for pattern, left in self._armed.items():
                if left > 0 and pattern in data:
                    self._armed[pattern] = left - 1
                    self.lost.append(pattern)
                    return pattern
        return None

    def __enter__(self) -> LossyRedis:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        stopped = self._stopped
        if stopped is not None:
            self._loop.call_soon_threadsafe(stopped.set)
        self._thread.join(10)

    def _main(self) -> None:
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stopped = asyncio.Event()
        handlers: set[asyncio.Task[None]] = set()
        writers: set[asyncio.StreamWriter] = set()

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            writers.add(writer)
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream)
            except OSError:
                writer.close()  # Redis is gone: so is the client's connection
                return
            writers.add(up_writer)
            try:
                await self._pipe(reader, writer, up_reader, up_writer)
            finally:
                for w in (writer, up_writer):
                    w.close()
                    writers.discard(w)
                handlers.discard(task)

        server = await asyncio.start_server(accepted, "127.0.0.1", self.port)
        self._ready.set()
        await self._stopped.wait()
        server.close()
        for w in list(writers):
            w.close()  # ends every pipe's reads, so each handler returns by itself
        await asyncio.gather(*handlers, return_exceptions=True)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        doomed = asyncio.Event()

        async def requests() -> None:
            tail = b""  # so that a pattern split across two reads is still found
            while data := await reader.read(65536):
                if self._doomed(tail + data) is not None:
                    doomed.set()
                tail = data[-256:]
                up_writer.write(data)
                await up_writer.drain()

        async def replies() -> None:
            while data := await up_reader.read(65536):
                if doomed.is_set():
                    await asyncio.sleep(SETTLE_SECONDS)
                    return  # the reply is dropped with the connection
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.create_task(requests()), asyncio.create_task(replies())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.contextmanager
def lossy(upstream_port: int) -> Iterator[LossyRedis]:
    with LossyRedis(upstream_port) as proxy:
        yield proxy
