"""The load generator: many SSE clients over loopback, in a process of its own.

It reads one scenario as JSON on stdin, drives the system under test over HTTP (aiohttp), and
prints ``RESULT <json>``. Every token's production time is in its payload (``ts<monotonic_ns>``), so
latency is receive time minus production time, on the machine's one wall clock. Scenarios that
hold connections open print ``READY`` and wait for a line on stdin before closing them, so the
caller can measure the server meanwhile.

    echo '{"system": "tokenrelay", "url": "...", "scenario": "streams", ...}' \\
        | python -m bench.loadgen
"""

from __future__ import annotations

import asyncio
import random
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import orjson
import uvloop

from bench.pacing import TOKEN, TS, Pace

ID_LINE = re.compile(rb"(?m)^id: ?(\S+)$")
CDF_POINTS = 500
"""Latency quantiles kept for the CDF plot."""


@dataclass
class Sink:
    """What all clients of a scenario received."""

    latencies_ns: list[int] = field(default_factory=list)
    """Receipt minus production (``ts``): what the relay adds."""
    schedule_ns: list[int] = field(default_factory=list)
    """Receipt minus the time the token was due by its pace (``du``): what a user waits."""
    steady_from_ns: int = 0
    """Tokens produced from then on also count in `steady_ns` (all streams were started)."""
    steady_ns: list[int] = field(default_factory=list)
    steady_schedule_ns: list[int] = field(default_factory=list)
    tokens: int = 0
    first_ns: int | None = None
    last_ns: int = 0
    errors: list[str] = field(default_factory=list)
    complete: int = 0

    def take(self, recv_ns: int, data: bytes) -> int:
        n = 0
        lat, steady, since = self.latencies_ns, self.steady_ns, self.steady_from_ns
        sched, steady_sched = self.schedule_ns, self.steady_schedule_ns
        for match in TOKEN.finditer(data):
            ts, due = int(match.group(1)), int(match.group(2))
            lat.append(recv_ns - ts)
            sched.append(recv_ns - due)
            if since and ts >= since:
                steady.append(recv_ns - ts)
                steady_sched.append(recv_ns - due)
            n += 1
        if n:
            self.tokens += n
            if self.first_ns is None:
                self.first_ns = recv_ns
            self.last_ns = recv_ns
        return n


class Target:
    """How to start and join a stream on one system."""

    def __init__(self, system: str, url: str, session: aiohttp.ClientSession) -> None:
        self.system = system
        self.url = url.rstrip("/")
        self.http = session

    @property
    def protocol(self) -> bool:
        """The agent streaming protocol (`useStream` v1) rather than the classic run stream."""
        return self.system == "tokenrelay-protocol"

    async def _protocol_run(self, thread_id: str, pace: Pace) -> None:
        body = self._run_body(pace)
        params = {"assistant_id": body["assistant_id"], "input": body["input"]}
        command = {"id": 1, "method": "run.start", "params": params}
        async with self.http.post(f"{self.url}/threads/{thread_id}/commands", json=command) as r:
            r.raise_for_status()

    async def _protocol_stream(self, thread_id: str) -> aiohttp.ClientResponse:
        body = {"channels": ["messages", "lifecycle"]}
        resp = await self.http.post(f"{self.url}/threads/{thread_id}/stream/events", json=body)
        resp.raise_for_status()
        return resp

    def _run_body(self, pace: Pace) -> dict[str, Any]:
        writer = self.system == "tokenrelay-writer"
        content = orjson.dumps(pace.params()).decode()
        return {
            "assistant_id": "paced-writer" if writer else "paced",
            "input": {"messages": [{"role": "user", "content": content}]},
            "stream_mode": ["custom"] if writer else ["messages-tuple"],
        }

    async def open_direct(self, pace: Pace) -> aiohttp.ClientResponse:
        """Start a stream and read it on this same request (the SDKs' `runs.stream`; on the
        protocol, the hook's subscription, then `run.start`)."""
        if self.protocol:
            thread_id = str(uuid.uuid4())
            resp = await self._protocol_stream(thread_id)
            await self._protocol_run(thread_id, pace)
            return resp
        if self.system.startswith("tokenrelay"):
            resp = await self.http.post(f"{self.url}/runs/stream", json=self._run_body(pace))
        else:
            resp = await self.http.post(
                f"{self.url}/streams/{uuid.uuid4().hex}", params=pace.params()
            )
        resp.raise_for_status()
        return resp

    async def start_background(self, pace: Pace) -> dict[str, str]:
        if self.protocol:
            thread_id = str(uuid.uuid4())
            await self._protocol_run(thread_id, pace)
            return {"thread_id": thread_id}
        if self.system.startswith("tokenrelay"):
            async with self.http.post(f"{self.url}/runs", json=self._run_body(pace)) as resp:
                resp.raise_for_status()
                run = await resp.json()
                return {"thread_id": run["thread_id"], "run_id": run["run_id"]}
        key = uuid.uuid4().hex
        async with self.http.post(
            f"{self.url}/streams/{key}/background", params=pace.params()
        ) as resp:
            resp.raise_for_status()
        return {"id": key}

    async def join(self, handle: dict[str, str], resume: str | None) -> aiohttp.ClientResponse:
        """Join a stream; `resume` is a Last-Event-ID (or, on resumable-stream, characters to
        skip); None joins from the start."""
        headers: dict[str, str] = {}
        params: dict[str, str] = {}
        if self.protocol:
            return await self._protocol_stream(handle["thread_id"])
        if self.system.startswith("tokenrelay"):
            path = f"/threads/{handle['thread_id']}/runs/{handle['run_id']}/stream"
            headers["Last-Event-ID"] = resume or "0"
        elif self.system.startswith("resumable-stream"):
            path = f"/streams/{handle['id']}"
            if resume:
                params["skip"] = resume
        else:
            path = f"/streams/{handle['id']}"
            headers["Last-Event-ID"] = resume or "-1"
        resp = await self.http.get(self.url + path, headers=headers, params=params)
        resp.raise_for_status()
        return resp


PROTOCOL_END = re.compile(
    rb'"method":"lifecycle","params":\{"namespace":\[\][^\n]*'
    rb'"event":"(?:completed|failed|interrupted)"'
)


def _protocol_frames(buf: bytes) -> tuple[bytes, bool]:
    """The frames of a protocol stream that carry tokens (a block's finish repeats them all),
    and whether the run ended among them."""
    frames = [f for f in buf.split(b"\n\n") if b'"content-block-finish"' not in f]
    return b"\n\n".join(frames), PROTOCOL_END.search(buf) is not None


async def consume(
    resp: aiohttp.ClientResponse,
    sink: Sink,
    *,
    stop_after: int | None = None,
    protocol: bool = False,
) -> int:
    """Read SSE until the response ends (or `stop_after` tokens), feeding `sink`. A protocol
    stream spans runs: it is read until its run's last lifecycle event."""
    if resp.status != 200:
        resp.release()
        raise RuntimeError(f"HTTP {resp.status} instead of a stream")
    got = 0
    rest = b""
    try:
        async for chunk in resp.content.iter_any():
            buf = rest + chunk if rest else chunk
            end = buf.rfind(b"\n\n")
            if end < 0:
                rest = buf
                continue
            rest = buf[end + 2 :]
            frames = buf[: end + 2] if rest else buf
            ended = False
            if protocol:
                frames, ended = _protocol_frames(frames)
            got += sink.take(time.monotonic_ns(), frames)
            if ended or (stop_after is not None and got >= stop_after):
                break
    finally:
        resp.release()
    return got


def percentiles(values: list[int]) -> dict[str, float | None]:
    lat = sorted(values)

    def pct(p: float) -> float | None:
        return lat[min(len(lat) - 1, int(len(lat) * p))] / 1e6 if lat else None

    return {"p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "p999": pct(0.999),
            "max": lat[-1] / 1e6 if lat else None, "count": len(lat)}  # fmt: skip


def summary(sink: Sink, started_ns: int, expected: int) -> dict[str, Any]:
    lat = sorted(sink.latencies_ns)

    def pct(p: float) -> float | None:
        return lat[min(len(lat) - 1, int(len(lat) * p))] / 1e6 if lat else None

    span = (sink.last_ns - (sink.first_ns or sink.last_ns)) / 1e9
    wall = (sink.last_ns - started_ns) / 1e9 if sink.last_ns else 0.0
    return {
        "tokens": sink.tokens,
        "expected_tokens": expected,
        "complete_clients": sink.complete,
        "errors": sink.errors[:10],
        "error_count": len(sink.errors),
        "wall_seconds": wall,
        # From the first token received to the last: run start-up is not counted against any
        # system, and streams that wait for their readers are measured once they produce.
        "tokens_per_second": sink.tokens / span if span > 0 else None,
        "receive_span_seconds": span,
        "latency_ms": percentiles(sink.latencies_ns),
        "steady_latency_ms": percentiles(sink.steady_ns),
        # Against the pace's schedule: only meaningful for paced streams (unpaced tokens are all
        # due at the start).
        "schedule_latency_ms": percentiles(sink.schedule_ns),
        "steady_schedule_latency_ms": percentiles(sink.steady_schedule_ns),
        "latency_cdf_ms": [round(pct(i / CDF_POINTS) or 0.0, 3) for i in range(CDF_POINTS)]
        if lat
        else [],
    }


async def scenario_streams(target: Target, spec: dict[str, Any]) -> dict[str, Any]:
    """`streams` streams, each read by one client on the request that started it."""
    pace = Pace.from_json(spec["pace"])
    n = int(spec["streams"])
    ramp = float(spec.get("ramp_seconds", 1.0))
    started = time.monotonic_ns()
    # Steady state: every stream has started, a second ago.
    sink = Sink(steady_from_ns=started + int((ramp + 1.0) * 1e9))

    async def one(i: int) -> None:
        await asyncio.sleep(ramp * i / n)
        try:
            if target.system.endswith("-resumed"):
                # The stream is produced in the background; the client joins it as any reader
                # but its creator does (after a refresh, on another device). It starts producing
                # once every client is in: resumable-stream cannot replay a finished stream.
                late = Pace(**{**asdict(pace), "start_in_ms": (ramp + 1) * 1000})
                resp = await target.join(await target.start_background(late), None)
            else:
                resp = await target.open_direct(pace)
            if await consume(resp, sink, protocol=target.protocol) >= pace.tokens:
                sink.complete += 1
        except Exception as exc:  # counted and reported, never hidden
            sink.errors.append(repr(exc))

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), spec["timeout"])
    return summary(sink, started, n * pace.tokens)


async def scenario_fanout(target: Target, spec: dict[str, Any]) -> dict[str, Any]:
    """One stream read by `clients` clients, who all join before it produces."""
    pace = Pace.from_json(spec["pace"])
    n = int(spec["clients"])
    handle = await target.start_background(pace)
    started = time.monotonic_ns()
    sink = Sink()

    async def one() -> None:
        try:
            resp = await target.join(handle, None)
            if await consume(resp, sink, protocol=target.protocol) >= pace.tokens:
                sink.complete += 1
        except Exception as exc:
            sink.errors.append(repr(exc))

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), spec["timeout"])
    result = summary(sink, started, n * pace.tokens)
    # Delivery rate from the first token received to the last.
    span = result["receive_span_seconds"]
    result["events_per_second"] = sink.tokens / span if span else None
    if pace.interval_ms and pace.tokens > 1:
        # Paced: how much longer delivery took than the schedule, first token to last.
        result["wall_stretch"] = span / ((pace.tokens - 1) * pace.interval_ms / 1000)
    return result


async def read_marks(
    target: Target, resp: aiohttp.ClientResponse, tokens: int, mark_at: int
) -> str:
    """Read `tokens` tokens event by event; the resume point after token `mark_at`: its event
    id, or on resumable-stream the characters read so far."""
    seen = 0
    offset = 0
    mark = ""
    rest = b""
    try:
        async for chunk in resp.content.iter_any():
            buf = rest + chunk
            *events, rest = buf.split(b"\n\n")
            for ev in events:
                offset += len(ev) + 2
                if TS.search(ev):
                    seen += 1
                    if seen == mark_at:
                        if target.system.startswith("resumable-stream"):
                            mark = str(offset)
                        else:
                            found = ID_LINE.search(ev)
                            mark = found.group(1).decode() if found else ""
                if seen >= tokens:
                    return mark
    finally:
        resp.release()
    raise RuntimeError(f"stream ended after {seen} of {tokens} tokens")


async def scenario_resume(target: Target, spec: dict[str, Any]) -> dict[str, Any]:
    """Join a run that has produced `history` events: first byte and full replay from the
    start, and first byte resuming half way (Last-Event-ID), `repeats` times each."""
    history = int(spec["history"])
    pace = Pace(tokens=history + int(spec["tail"]), burst=history, interval_ms=spec["tail_ms"])
    handle = await target.start_background(pace)
    mark = await read_marks(target, await target.join(handle, None), history, history // 2)
    full_first, full_all, mid_first = [], [], []
    for _ in range(int(spec["repeats"])):
        for resume in (None, mark):
            t0 = time.perf_counter()
            resp = await target.join(handle, resume)
            got = 0
            first = None
            want = history if resume is None else history - history // 2
            try:
                async for chunk in resp.content.iter_any():
                    n = len(TS.findall(chunk))
                    if n and first is None:
                        first = time.perf_counter() - t0
                    got += n
                    if got >= want:
                        break
            finally:
                resp.release()
            if first is None or got < want:
                raise RuntimeError(f"replay got {got} of {want} tokens")
            if resume is None:
                full_first.append(first * 1000)
                full_all.append((time.perf_counter() - t0) * 1000)
            else:
                mid_first.append(first * 1000)

    def med(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    return {
        "history": history,
        "repeats": len(full_first),
        "first_byte_ms": med(full_first),
        "full_replay_ms": med(full_all),
        "resume_first_byte_ms": med(mid_first),
        "replay_events_per_second": history / (med(full_all) / 1000),
    }


async def scenario_idle(target: Target, spec: dict[str, Any]) -> dict[str, Any]:
    """`clients` SSE connections on runs that stay quiet; READY once all are open."""
    n, runs = int(spec["clients"]), int(spec["runs"])
    quiet = Pace(tokens=1, start_in_ms=600_000)
    handles = [await target.start_background(quiet) for _ in range(runs)]
    responses = await asyncio.gather(*(target.join(handles[i % runs], None) for i in range(n)))
    await asyncio.sleep(float(spec.get("settle_seconds", 2.0)))
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    open_count = sum(1 for r in responses if not r.content.at_eof())
    for r in responses:
        r.close()
    return {"clients": n, "runs": runs, "open_at_measure": open_count}


async def start_on_thread(target: Target, pace: Pace) -> tuple[str, str, aiohttp.ClientResponse]:
    """A new thread and a run streamed on it (`POST /threads/{tid}/runs/stream`): thread id,
    run id and the open stream."""
    async with target.http.post(f"{target.url}/threads", json={}) as r:
        tid = (await r.json())["thread_id"]
    resp = await target.http.post(
        f"{target.url}/threads/{tid}/runs/stream", json=target._run_body(pace)
    )
    resp.raise_for_status()
    return tid, resp.headers["Content-Location"].rsplit("/", 1)[1], resp


async def timed_cancel(target: Target, thread_id: str, run_id: str) -> float:
    """`POST .../cancel?wait=1`, in ms to its answer; the run must have ended `interrupted`."""
    t0 = time.perf_counter()
    async with target.http.post(
        f"{target.url}/threads/{thread_id}/runs/{run_id}/cancel", params={"wait": "1"}
    ) as r:
        run = await r.json()
    elapsed = (time.perf_counter() - t0) * 1000
    if run.get("status") != "interrupted":
        raise RuntimeError(f"cancel left the run {run.get('status')}")
    return elapsed


async def scenario_cancel(target: Target, spec: dict[str, Any]) -> dict[str, Any]:
    """tokenrelay only: `POST .../cancel?wait=1` after a random 3-40 tokens, timed to its
    answer (the run ended with its partial message saved)."""
    rng = random.Random(7)
    sem = asyncio.Semaphore(int(spec["concurrency"]))
    pace = Pace(tokens=400, interval_ms=20)

    async def one() -> float:
        async with sem:
            tid, run_id, resp = await start_on_thread(target, pace)
            await consume(resp, Sink(), stop_after=rng.randint(3, 40))
            return await timed_cancel(target, tid, run_id)

    times = await asyncio.gather(*(one() for _ in range(int(spec["cancels"]))))
    return {"cancels": len(times), **_quantiles(times)}


def _quantiles(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {
        "p50_ms": values[len(values) // 2],
        "p99_ms": values[min(len(values) - 1, int(len(values) * 0.99))],
        "max_ms": values[-1],
    }


async def timed_resume(target: Target, thread_id: str, run_id: str, cursor: str) -> float:
    """Reconnect to a run with `Last-Event-ID: cursor`, in ms to its first token."""
    t0 = time.perf_counter()
    resp = await target.http.get(
        f"{target.url}/threads/{thread_id}/runs/{run_id}/stream",
        headers={"Last-Event-ID": cursor},
    )
    try:
        async for chunk in resp.content.iter_any():
            if TS.search(chunk):
                return (time.perf_counter() - t0) * 1000
    finally:
        resp.release()
    raise RuntimeError("a resume ended without a token")


async def checked_cancel(target: Target, thread_id: str, run_id: str) -> float:
    """`timed_cancel`, then a check that the run's partial reply was kept: its last `values`
    event ends with it (its state lives in the worker's checkpointer, which the bench does not
    share with the API)."""
    elapsed = await timed_cancel(target, thread_id, run_id)
    resp = await target.http.get(
        f"{target.url}/threads/{thread_id}/runs/{run_id}/stream", headers={"Last-Event-ID": "0"}
    )
    try:
        body = await resp.read()
    finally:
        resp.release()
    values = [f for f in body.split(b"\n\n") if f.startswith(b"event: values")]
    last = values[-1] if values else b""
    if b'"finish_reason":"cancelled"' not in last or b'"content":"ts' not in last:
        tail = (last or body)[-300:]
        raise RuntimeError(f"a cancelled run's partial reply was not kept: {tail!r}")
    return elapsed


class ProbeClient:
    """A client in a process of its own (`bench.probe`) that times the requests it is asked
    for: the scenario's own readers load this process's event loop, and a user's browser does
    not share its loop with a few hundred other users' streams."""

    def __init__(self, target: Target) -> None:
        self._target = target
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[float]] = {}
        self._next = 0

    async def __aenter__(self) -> ProbeClient:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.probe",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())
        await self.ask({"op": "hello", "system": self._target.system, "url": self._target.url})
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.close()
        await self._proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    async def ask(self, request: dict[str, Any]) -> float:
        """Have the probe run `request` (an `op` of `bench.probe`); its time in ms."""
        assert self._proc is not None and self._proc.stdin is not None
        self._next += 1
        fut = self._waiting[self._next] = asyncio.get_running_loop().create_future()
        self._proc.stdin.write(orjson.dumps({**request, "id": self._next}) + b"\n")
        await self._proc.stdin.drain()
        return await fut

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for line in self._proc.stdout:
            answer = orjson.loads(line)
            fut = self._waiting.pop(int(answer["id"]))
            if "error" in answer:
                fut.set_exception(RuntimeError(answer["error"]))
            else:
                fut.set_result(float(answer["ms"]))
        for fut in self._waiting.values():
            fut.set_exception(RuntimeError("the probe process ended"))


async def scenario_under_load(target: Target, spec: dict[str, Any]) -> dict[str, Any]:
    """tokenrelay only: `load_runs` paced runs streaming, each to a reader of its own; while
    they stream, for each level of `concurrency` in turn, `resumes` reconnects (`Last-Event-ID`
    of the fifth-newest token a reader had) timed to their first token, then `cancels` of the
    load's runs (`POST .../cancel?wait=1`) timed to their answer, each checked to have ended
    `interrupted` with its partial reply kept; that many of each at a time. A `ProbeClient`
    sends and times them, so that the load's readers, whose reading is this process's work, do
    not delay them. The first level's figures are `resume` and `cancel`, every level's are
    under `levels`. Every level's resumes come first; each level's cancels end runs of the
    load, so the next level's cancels have that many fewer streaming (`runs_streaming`)."""
    pace = Pace.from_json(spec["pace"])
    n = int(spec["load_runs"])
    levels = [int(c) for c in spec["concurrency"]]
    rng = random.Random(11)
    url, http = target.url, target.http
    runs: list[tuple[str, str]] = []
    cursors: list[list[str]] = []
    stop = asyncio.Event()

    async def reader(i: int) -> None:
        await asyncio.sleep(float(spec["ramp_seconds"]) * i / n)
        tid, rid, resp = await start_on_thread(target, pace)
        runs.append((tid, rid))
        got: list[str] = []
        cursors.append(got)
        await read_cursors(target, resp, got, stop)

    readers = [asyncio.create_task(reader(i)) for i in range(n)]
    measured: dict[str, Any] = {}
    try:
        async with ProbeClient(target) as probe:
            # Every run streaming, each a few tokens in, before the first measurement.
            while len(cursors) < n or min(len(c) for c in cursors) < 5:
                if any(t.done() and t.exception() for t in readers):
                    raise RuntimeError("a load reader failed")
                await asyncio.sleep(0.05)
            load_start = time.perf_counter()
            uncancelled = list(range(n))
            rng.shuffle(uncancelled)
            # Every level's resumes first (they end no run), then every level's cancels.
            for level in levels:
                sem = asyncio.Semaphore(level)

                async def resume() -> float:
                    async with sem:  # noqa: B023 (awaited within its iteration)
                        i = rng.randrange(n)
                        tid, rid = runs[i]
                        # A few tokens back, so the first token is a catch-up one, not the next
                        # one the producer makes.
                        return await probe.ask({"op": "resume", "thread_id": tid, "run_id": rid,
                                                "cursor": cursors[i][-5]})  # fmt: skip

                streaming = sum(1 for t in readers if not t.done())
                resumes = await asyncio.gather(*(resume() for _ in range(int(spec["resumes"]))))
                measured[str(level)] = {
                    "at_a_time": level,
                    "resume": {"count": len(resumes), "runs_streaming": streaming,
                               **_quantiles(resumes)},
                }  # fmt: skip
            for level in levels:
                sem = asyncio.Semaphore(level)

                async def cancel(i: int) -> float:
                    async with sem:  # noqa: B023
                        tid, rid = runs[i]
                        return await probe.ask({"op": "cancel", "thread_id": tid, "run_id": rid})

                streaming = sum(1 for t in readers if not t.done())
                picked = [uncancelled.pop() for _ in range(min(len(uncancelled),
                                                               int(spec["cancels"])))]  # fmt: skip
                cancels = await asyncio.gather(*(cancel(i) for i in picked))
                measured[str(level)]["cancel"] = {
                    "count": len(cancels),
                    "runs_streaming": streaming,
                    **_quantiles(cancels),
                }
            measured_s = time.perf_counter() - load_start
            still = sum(1 for t in readers if not t.done())
    finally:
        stop.set()
        for t in readers:
            t.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        # The rest of the load ends here, not during the next scenario.
        for tid, rid in runs:
            async with http.post(f"{url}/threads/{tid}/runs/{rid}/cancel") as r:
                r.release()
    first = measured[str(levels[0])]
    return {
        "load_runs": n,
        "readers_streaming_at_end": still,
        "measured_seconds": measured_s,
        "timed_by": "a client process of its own",
        "at_a_time": levels[0],
        "resume": first["resume"],
        "cancel": first["cancel"],
        "levels": measured,
    }


async def read_cursors(
    target: Target, resp: aiohttp.ClientResponse, cursors: list[str], stop: asyncio.Event
) -> None:
    """Read a stream from its start until `stop`, appending after each token the cursor that
    resumes right after it (its event id; on resumable-stream, the characters read so far)."""
    chars = target.system.startswith("resumable-stream")
    offset = 0
    rest = b""
    try:
        async for chunk in resp.content.iter_any():
            *events, rest = (rest + chunk).split(b"\n\n")
            for ev in events:
                offset += len(ev) + 2
                if TS.search(ev):
                    if chars:
                        cursors.append(str(offset))
                    else:
                        found = ID_LINE.search(ev)
                        cursors.append(found.group(1).decode() if found else "")
            if stop.is_set():
                return
    finally:
        resp.release()


@dataclass
class Rejoin:
    """One reader of the storm: where it resumes and what it got."""

    handle: dict[str, str]
    after: int
    """The index of the last token it had: it must get every later one, once."""
    cursor: str
    indexes: list[int] = field(default_factory=list)
    caught_up_ns: int | None = None
    first_ns: int | None = None


async def scenario_storm(target: Target, spec: dict[str, Any]) -> dict[str, Any]:
    """`runs` paced runs, each read from its start by one client; once every run has produced
    `storm_after` tokens those clients drop, and `readers` clients reconnect at the same moment,
    spread over the runs, each with the cursor of a random token it had already read. Each must
    get every later token exactly once (indexes contiguous); it is caught up when it receives a
    token produced after it reconnected (or the run's last, if the run ended first)."""
    pace = Pace.from_json(spec["pace"])
    runs, readers = int(spec["runs"]), int(spec["readers"])
    storm_after = int(spec["storm_after"])
    rng = random.Random(16)
    handles = await asyncio.gather(*(target.start_background(pace) for _ in range(runs)))
    stop = asyncio.Event()
    cursors: list[list[str]] = [[] for _ in range(runs)]
    primers = [
        asyncio.create_task(read_cursors(target, await target.join(h, None), c, stop))
        for h, c in zip(handles, cursors, strict=True)
    ]
    deadline = time.monotonic() + float(spec["timeout"]) / 2
    while min(len(c) for c in cursors) < storm_after:
        if time.monotonic() > deadline or any(t.done() for t in primers):
            stop.set()
            await asyncio.gather(*primers, return_exceptions=True)
            raise RuntimeError(f"runs did not reach {storm_after} tokens before the storm")
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.gather(*primers, return_exceptions=True)
    rejoins = []
    for i in range(readers):
        run = i % runs
        after = rng.randrange(len(cursors[run]))
        rejoins.append(Rejoin(handles[run], after, cursors[run][after]))
    sink = Sink()
    expected = sum(pace.tokens - 1 - r.after for r in rejoins)

    async def one(r: Rejoin) -> None:
        sent_ns = time.monotonic_ns()
        try:
            resp = await target.join(r.handle, r.cursor)
            if resp.status != 200:
                resp.release()
                raise RuntimeError(f"HTTP {resp.status} instead of a stream")
            rest = b""
            async for chunk in resp.content.iter_any():
                now = time.monotonic_ns()
                buf = rest + chunk
                end = buf.rfind(b"\n\n")
                if end < 0:
                    rest = buf
                    continue
                frames, rest = buf[: end + 2], buf[end + 2 :]
                sink.take(now, frames)
                for match in TOKEN.finditer(frames):
                    index = int(match.group(3))
                    r.indexes.append(index)
                    if r.first_ns is None:
                        r.first_ns = now
                    # Caught up: a token made after it reconnected, or the run's last one when
                    # the run ended first.
                    late = int(match.group(1)) >= sent_ns or index == pace.tokens - 1
                    if r.caught_up_ns is None and late:
                        r.caught_up_ns = now
            resp.release()
        except Exception as exc:
            sink.errors.append(repr(exc))
            return
        if r.indexes == list(range(r.after + 1, pace.tokens)):
            sink.complete += 1
        else:
            want = set(range(r.after + 1, pace.tokens))
            sink.errors.append(
                f"reader resuming after token {r.after}: {len(want - set(r.indexes))} missing, "
                f"{len(r.indexes) - len(set(r.indexes))} twice, "
                f"{'in order' if r.indexes == sorted(r.indexes) else 'out of order'}"
            )

    started = time.monotonic_ns()
    await asyncio.wait_for(asyncio.gather(*(one(r) for r in rejoins)), spec["timeout"])
    result = summary(sink, started, expected)
    gaps = duplicates = 0
    for r in rejoins:
        got = r.indexes
        duplicates += len(got) - len(set(got))
        gaps += len(set(range(r.after + 1, pace.tokens)) - set(got))
    caught = [r.caught_up_ns - started for r in rejoins if r.caught_up_ns is not None]
    first = [r.first_ns - started for r in rejoins if r.first_ns is not None]
    result.update(
        runs=runs,
        readers=readers,
        # What every reader received, the clients that dropped included: what the servers'
        # CPU over the scenario is divided by.
        delivered_tokens=sink.tokens + sum(len(c) for c in cursors),
        exact_readers=sink.complete,
        missing_tokens=gaps,
        duplicate_tokens=duplicates,
        caught_up_readers=len(caught),
        # From the moment every reader sent its request at once.
        caught_up_ms=percentiles(caught),
        all_caught_up_ms=max(caught) / 1e6 if len(caught) == readers else None,
        first_token_ms=percentiles(first),
    )
    return result


async def scenario_demo_runs(target: Target, spec: dict[str, Any]) -> dict[str, Any]:
    """`runs` runs of the demo chat graph started at once, each on a thread of its own and read
    on the request that starts it (`POST /threads/{tid}/runs/stream`, `messages-tuple`, as
    `client.runs.stream` sends it). A run's stretch is its wall time over its ideal one (its
    words times the delay between them)."""
    n, words = int(spec["runs"]), int(spec["words"])
    ideal = words * float(spec["delay_ms"]) / 1000
    sink = Sink()
    walls: list[float] = []
    url, http = target.url, target.http
    started = time.monotonic_ns()

    async def one(i: int) -> None:
        t0 = time.monotonic()
        try:
            async with http.post(f"{url}/threads", json={}) as r:
                r.raise_for_status()
                tid = (await r.json())["thread_id"]
            body = {
                "assistant_id": "agent",
                "input": {"messages": [{"role": "user", "content": f"question {i}"}]},
                "stream_mode": ["messages-tuple"],
            }
            got = 0
            rest = b""
            async with http.post(f"{url}/threads/{tid}/runs/stream", json=body) as resp:
                resp.raise_for_status()
                async for chunk in resp.content.iter_any():
                    # The Agent Server ends its lines with CRLF, tokenrelay with LF.
                    buf = (rest + chunk).replace(b"\r\n", b"\n")
                    *events, rest = buf.split(b"\n\n")
                    now = time.monotonic_ns()
                    for ev in events:
                        if ev.startswith(b"event: messages\n") and _has_content(ev):
                            got += 1
                    if got:
                        sink.first_ns = sink.first_ns or now
                        sink.last_ns = max(sink.last_ns, now)
            sink.tokens += got
            walls.append(time.monotonic() - t0)
            if got == words:
                sink.complete += 1
            else:
                sink.errors.append(f"run {i}: {got} of {words} tokens")
        except Exception as exc:
            sink.errors.append(repr(exc))

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), spec["timeout"])
    end_ns = sink.last_ns or time.monotonic_ns()
    stretch = sorted(w / ideal for w in walls)

    def pct(p: float) -> float | None:
        return stretch[min(len(stretch) - 1, int(len(stretch) * p))] if stretch else None

    return {
        "runs": n,
        "tokens": sink.tokens,
        "expected_tokens": n * words,
        "complete_clients": sink.complete,
        "errors": sink.errors[:10],
        "error_count": len(sink.errors),
        # From the first request to the last token, start-up included: what the users saw.
        "tokens_per_second": sink.tokens / ((end_ns - started) / 1e9),
        "wall_seconds": (end_ns - started) / 1e9,
        "ideal_run_seconds": ideal,
        "stretch": {"p50": pct(0.5), "p99": pct(0.99), "max": stretch[-1] if stretch else None},
    }


MESSAGE_CONTENT = re.compile(rb'^data: \[\{[^\n]*?"content":"(?!")', re.M)


def _has_content(event: bytes) -> bool:
    """Whether a `messages` event carries a non-empty text chunk (not a closing or empty one)."""
    return MESSAGE_CONTENT.search(event) is not None


SCENARIOS = {
    "streams": scenario_streams,
    "storm": scenario_storm,
    "demo_runs": scenario_demo_runs,
    "fanout": scenario_fanout,
    "resume": scenario_resume,
    "idle": scenario_idle,
    "cancel": scenario_cancel,
    "under_load": scenario_under_load,
}


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        target = Target(spec["system"], spec["url"], session)
        return await SCENARIOS[spec["scenario"]](target, spec)


def answer(scenario: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]) -> None:
    """Run `scenario` on the spec read from stdin (one JSON line) and print its result as
    ``RESULT <json>``, a failure as its result: how `bench.suite` runs a measurement in a process
    of its own."""
    spec = orjson.loads(sys.stdin.readline())
    try:
        result = uvloop.run(scenario(spec))
    except Exception as exc:  # reported in the results, so one failure does not end the suite
        result = {"failed": f"{type(exc).__name__}: {exc}"}
    print("RESULT " + orjson.dumps(result).decode(), flush=True)


def main() -> None:
    answer(run)


if __name__ == "__main__":
    main()
