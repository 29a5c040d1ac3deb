"""A randomized soak under faults: runs streamed by readers that drop and resume on either of
two API processes, a third of them cancelled, while processes are paused and killed at random.

    python -m tests.soak --seed 1 --rounds 6

Two `tokenrelay api` and two `tokenrelay worker` processes share a Redis of their own and a
fresh database on the machine's Postgres (as the tests: `TOKENRELAY_TEST_POSTGRES`), with a
1.5 s lease. Each round starts `--runs` runs of the `twostep` graph (a planning node, then a
5 s streamed reply), each on a thread of its own, and a fault every 0.5 to 2 s, on a process
no other fault holds: a worker or an API paused for up to three leases or killed with SIGKILL
(and started again), or Redis paused for up to 3 s.
About a third of the runs get `cancel?wait=1` at a random moment, on either API.

Every run is then checked as a client would: it ended (`success`, or `interrupted` when it was
cancelled), what its reader received across every reconnect is byte-equal to a full replay, and
the thread's last message is the reply its last streaming attempt streamed: whole for a run
that succeeded, as far as it got (and marked cancelled) for one that was cancelled. Exits 1 if
any run failed a check. Not part of the test suite: it runs for minutes and its faults are
drawn at random; `docs/reliability.md` records what it found.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import fresh_database
from tests.graphs import GRAPHS
from tests.integration.test_worker import TWOSTEP_REPLY
from tests.server import WorkerProcess, stop_leftovers
from tests.sse import SSE, iter_sse
from tokenrelay.broker.embedded import EmbeddedRedis
from tokenrelay.broker.settings import Settings

LEASE = 1.5
RUN = {
    "assistant_id": "twostep",
    "input": {"messages": [{"role": "user", "content": "tell me about resumable streams"}]},
    "stream_mode": ["messages-tuple", "values", "updates"],
}
TRANSIENT = (httpx.TransportError,)


@dataclass
class Outcome:
    thread_id: str = ""
    run_id: str = ""
    got: list[SSE] = field(default_factory=list)
    reconnects: int = 0
    cancel: int | None = None
    """The cancel's answer (its status code), if the run was cancelled."""
    problems: list[str] = field(default_factory=list)
    attempts: int = 0


class Cluster:
    """The processes of the soak, each of which a fault may pause or kill."""

    def __init__(self, settings: Settings, logs: Path, redis: EmbeddedRedis) -> None:
        self.settings = settings
        self.logs = logs
        self.redis = redis
        self.apis = [self._spawn("api", i) for i in range(2)]
        self.workers = [self._spawn("worker", i) for i in range(2)]
        self.faults: Counter[str] = Counter()
        self._held: set[tuple[str, int]] = set()

    def _spawn(self, command: str, i: int) -> WorkerProcess:
        log = self.logs / f"{command}{i}-{uuid.uuid4().hex[:6]}.log"
        return WorkerProcess(self.settings, log, command=command).start()

    def urls(self) -> list[str]:
        return [a.url for a in self.apis]

    async def inject(self, rng: random.Random) -> None:
        """One fault, drawn at random, on a process no other fault holds; it is over (the
        process resumed or restarted) on return. Faults on different processes overlap."""
        kind = rng.choice(["pause worker", "kill worker", "pause api", "kill api", "pause redis"])
        seconds = rng.uniform(0.5, 3 * LEASE)
        group = self.workers if kind.endswith("worker") else self.apis
        i = rng.randrange(len(group))
        held = ("redis", 0) if kind == "pause redis" else (kind.split()[1], i)
        if held in self._held:
            return
        self._held.add(held)
        self.faults[kind] += 1
        try:
            if kind == "pause redis":
                os.kill(self.redis.pid or 0, signal.SIGSTOP)
                try:
                    await asyncio.sleep(min(seconds, 3.0))  # under the clients' socket timeout
                finally:
                    os.kill(self.redis.pid or 0, signal.SIGCONT)
                return
            proc = group[i]
            if kind.startswith("pause"):
                proc.signal(signal.SIGSTOP)
                try:
                    await asyncio.sleep(seconds)
                finally:
                    proc.signal(signal.SIGCONT)
            else:
                proc.signal(signal.SIGKILL)
                proc.wait()
                await asyncio.sleep(rng.uniform(0, LEASE))
                group[i] = await asyncio.to_thread(self._spawn, proc.command, i)
        finally:
            self._held.discard(held)

    def stop(self) -> None:
        for p in [*self.apis, *self.workers]:
            p.stop()


async def call(cluster: Cluster, rng: random.Random, method: str, path: str,
               **kwargs: Any) -> httpx.Response:  # fmt: skip
    """A request to either API, sent again (bounded) while the one it reached is away or
    answers 503: only for requests that may be applied twice (reads, a cancel, a new thread)."""
    for _ in range(100):
        try:
            async with httpx.AsyncClient(base_url=rng.choice(cluster.urls()), timeout=30) as c:
                r = await c.request(method, path, **kwargs)
            if r.status_code != 503:
                return r
        except TRANSIENT:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{method} {path}: no API answered")


async def start_run(cluster: Cluster, rng: random.Random, thread_id: str) -> httpx.Response:
    """Start the thread's run; a start whose answer was lost (its API killed) may have been
    applied, so the thread's runs are read before it is sent again."""
    for _ in range(100):
        try:
            async with httpx.AsyncClient(base_url=rng.choice(cluster.urls()), timeout=30) as c:
                r = await c.post(f"/threads/{thread_id}/runs", json=RUN)
            if r.status_code != 503:
                return r
        except (httpx.ConnectError, httpx.ConnectTimeout):
            pass  # nothing was sent
        except TRANSIENT:
            runs = await call(cluster, rng, "GET", f"/threads/{thread_id}/runs")
            if runs.status_code == 200 and runs.json():
                return httpx.Response(200, json=runs.json()[0])
        await asyncio.sleep(0.2)
    raise RuntimeError("no API started the run")


async def read_run(cluster: Cluster, rng: random.Random, out: Outcome) -> None:
    """Read the run's stream, hanging up after 1 to 60 events and resuming with Last-Event-ID
    on either API, until it ends."""
    path = f"/threads/{out.thread_id}/runs/{out.run_id}/stream"
    while True:
        budget = rng.randint(1, 60)
        headers = {"Last-Event-ID": (out.got[-1].id if out.got else None) or "-1"}
        try:
            async with (
                httpx.AsyncClient(base_url=rng.choice(cluster.urls()), timeout=30) as c,
                c.stream("GET", path, headers=headers) as r,
            ):
                if r.status_code == 503:
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                    out.reconnects += 1
                    continue
                if r.status_code != 200:
                    out.problems.append(f"join answered {r.status_code}: {await r.aread()!r}")
                    return
                async for item in iter_sse(r):
                    if isinstance(item, SSE):
                        out.got.append(item)
                        budget -= 1
                        if budget == 0:
                            break
                else:
                    return  # the stream ended
        except TRANSIENT:
            await asyncio.sleep(0.1)
        out.reconnects += 1


async def one_run(cluster: Cluster, seed: int, cancel_share: float) -> Outcome:
    rng = random.Random(seed)
    out = Outcome()
    r = await call(cluster, rng, "POST", "/threads", json={})
    out.thread_id = r.json()["thread_id"]
    r = await start_run(cluster, rng, out.thread_id)
    if r.status_code != 200:
        out.problems.append(f"run start answered {r.status_code}: {r.text}")
        return out
    out.run_id = r.json()["run_id"]
    reading = asyncio.create_task(read_run(cluster, rng, out))
    if rng.random() < cancel_share:
        await asyncio.sleep(rng.uniform(0.5, 6))
        where = f"/threads/{out.thread_id}/runs/{out.run_id}/cancel"
        r = await call(cluster, rng, "POST", where, params={"wait": 1})
        out.cancel = r.status_code
    try:
        await asyncio.wait_for(reading, 180)
    except TimeoutError:
        out.problems.append("the stream did not end within 180 s")
    return out


def streamed(got: list[SSE]) -> str:
    """What the last attempt that streamed the reply streamed of it."""
    per: dict[int, list[str]] = {}
    attempt = 0
    for e in got:
        if e.event == "metadata":
            attempt = e.json()["attempt"]
        elif e.event == "messages":
            chunk, meta = e.json()
            if meta.get("langgraph_node") == "llm":
                per.setdefault(attempt, []).append(chunk["content"])
    return "".join(per[max(per)]) if per else ""


async def check(cluster: Cluster, out: Outcome) -> None:
    if out.problems or not out.run_id:
        return
    rng = random.Random(0)
    base = f"/threads/{out.thread_id}"
    run = (await call(cluster, rng, "GET", f"{base}/runs/{out.run_id}")).json()
    allowed = {"success", "interrupted"} if out.cancel is not None else {"success"}
    if run.get("status") not in allowed:
        out.problems.append(f"status {run.get('status')} (attempt {run.get('attempt')}): "
                            f"{run.get('error') or ''}")  # fmt: skip
    if out.cancel is not None and out.cancel not in (200, 202):
        out.problems.append(f"cancel answered {out.cancel}")
    replay: list[SSE] = []
    async with (
        httpx.AsyncClient(base_url=cluster.urls()[0], timeout=30) as c,
        c.stream("GET", f"{base}/runs/{out.run_id}/stream", headers={"Last-Event-ID": "-1"}) as r,
    ):
        replay = [e async for e in iter_sse(r) if isinstance(e, SSE)]
    if [(e.id, e.event, e.data) for e in out.got] != [(e.id, e.event, e.data) for e in replay]:
        out.problems.append(f"received {len(out.got)} events, the replay holds {len(replay)}")
    state = (await call(cluster, rng, "GET", f"{base}/state")).json()
    messages = (state.get("values") or {}).get("messages") or []
    last = messages[-1] if messages else {}
    kept = str(last.get("content"))
    cancelled = (last.get("response_metadata") or {}).get("finish_reason") == "cancelled"
    text = streamed(out.got)
    if not TWOSTEP_REPLY.startswith(text):
        out.problems.append(f"streamed {text[:40]!r}..., not the reply")
    # The reply is whole where its node completed: an attempt whose worker was then paused
    # or cut off may have checkpointed it with its last tokens still unsent (the next
    # attempt resumes after the node and streams none of it; `values` carries it whole).
    if run.get("status") == "success" and (kept != TWOSTEP_REPLY or cancelled):
        out.problems.append(f"succeeded, the thread keeps {len(kept.split())} words"
                            f"{' marked cancelled' if cancelled else ''}")  # fmt: skip
    if run.get("status") == "interrupted":
        whole = kept == TWOSTEP_REPLY and not cancelled  # cancelled after the reply completed
        partial = kept == text and cancelled
        # Cancelled before its reply began: the plan, the input, or (never started) nothing.
        unstarted = not text and (not messages or last.get("type") == "human"
                                  or last.get("name") == "planner")  # fmt: skip
        if not (whole or partial or unstarted):
            out.problems.append(f"cancelled after {len(text.split())} words streamed, the "
                                f"thread keeps {len(kept.split())}"
                                f"{' marked cancelled' if cancelled else ''}")  # fmt: skip
    out.attempts = int(run.get("attempt") or 0)


async def soak(args: argparse.Namespace, database: str) -> int:
    logs = Path(tempfile.mkdtemp(prefix="tokenrelay-soak-"))
    redis = EmbeddedRedis().start()
    settings = Settings(
        redis_url=redis.url, key_prefix="soak", graphs=GRAPHS, checkpointer=database,
        lease_seconds=LEASE, heartbeat_seconds=1.0, shutdown_grace_seconds=2.5,
        max_attempts=args.max_attempts,
    )  # fmt: skip
    cluster = Cluster(settings, logs, redis)
    rng = random.Random(args.seed)
    outcomes: list[Outcome] = []
    try:
        for round_ in range(args.rounds):
            base = (args.seed * 1000 + round_) * 1000
            runs = [asyncio.create_task(one_run(cluster, base + i, args.cancel))
                    for i in range(args.runs)]  # fmt: skip
            faults: list[asyncio.Task[None]] = []
            while not all(t.done() for t in runs):
                await asyncio.wait(runs, timeout=rng.uniform(*args.fault_every))
                if not all(t.done() for t in runs):
                    faults.append(asyncio.create_task(cluster.inject(rng)))
            await asyncio.gather(*faults)
            got = []
            for t in runs:
                try:
                    got.append(t.result())
                except Exception as exc:  # the soak's own failure: counted, not hidden
                    got.append(Outcome(problems=[f"{type(exc).__name__}: {exc}"]))
            for out in got:
                try:
                    await check(cluster, out)
                except Exception as exc:
                    out.problems.append(f"check failed: {type(exc).__name__}: {exc}")
            bad = [o for o in got if o.problems]
            print(f"round {round_ + 1}: {len(got) - len(bad)}/{len(got)} runs whole, "
                  f"{sum(o.cancel is not None for o in got)} cancelled, "
                  f"{sum(o.reconnects for o in got)} reconnects", flush=True)  # fmt: skip
            for o in bad:
                print(f"  run {o.run_id} (thread {o.thread_id}): {'; '.join(o.problems)}")
            outcomes += got
    finally:
        cluster.stop()
        stop_leftovers()
        redis.stop()
    bad = [o for o in outcomes if o.problems]
    attempts = Counter(o.attempts for o in outcomes)
    print(json.dumps({"runs": len(outcomes), "failed": len(bad), "faults": cluster.faults,
                      "attempts": dict(sorted(attempts.items())), "logs": str(logs)}))  # fmt: skip
    return 1 if bad else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--runs", type=int, default=40, help="runs at once, per round")
    parser.add_argument(
        "--fault-every", type=float, nargs=2, default=(0.5, 2.0), metavar=("MIN", "MAX"),
        help="seconds between faults, drawn between",
    )  # fmt: skip
    parser.add_argument(
        "--max-attempts", type=int, default=10,
        help="TOKENRELAY_MAX_ATTEMPTS: dense faults can take a run over more than the default 3",
    )  # fmt: skip
    parser.add_argument("--cancel", type=float, default=0.33, help="share of runs cancelled")
    args = parser.parse_args()
    started = time.monotonic()
    with fresh_database() as database:
        code = asyncio.run(soak(args, database))
    print(f"{time.monotonic() - started:.0f} s")
    sys.exit(code)


if __name__ == "__main__":
    main()
