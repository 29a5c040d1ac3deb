"""The side-by-side suite: tokenrelay, Vercel resumable-stream, a naive baseline and the raw
ceiling, run one after another on this machine with the same payload and pacing.

Each system runs in its own processes on a fresh redis-server; the load generator
(bench/loadgen.py) runs in another. Results go to JSON; the full run also rewrites the
side-by-side section of docs/benchmarks.md and its plots.

    tokenrelay bench --quick              # smoke check, under 3 minutes, one repetition
    tokenrelay bench                      # full suite, 3 repetitions; updates docs/benchmarks.md
    tokenrelay bench --systems tokenrelay naive --scenarios b c
    tokenrelay bench --systems tokenrelay-dev langgraph-dev --scenarios j
    tokenrelay bench --systems tokenrelay --into docs/benchmarks.json --why "..."
                                          # run a column again in place of the full run's

A partial run writes to ./bench-results unless --out or --into says otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from bench import report
from bench.systems import (
    DEMO_DELAY_MS,
    DEMO_WORDS,
    DESCRIPTIONS,
    SYSTEMS,
    Running,
    available,
    start,
)

ROOT = Path(__file__).resolve().parent.parent

# Scenario sizes. `c` runs at each stream count, which gives the throughput-vs-streams plot.
FULL: dict[str, Any] = {
    "a": {"tokens": 20_000},
    "b": {
        "streams": 1000,
        "tokens": 200,
        "interval_ms": 50,
        "ramp_seconds": 2.0,
        "sweep": [100, 250, 500],
    },
    "c": {"streams": [10, 100, 1000], "tokens_total": 200_000, "ramp_seconds": 1.0},
    "d": {"clients": 1000, "tokens": 1000, "start_in_ms": 5000},
    "e": {"history": 10_000, "tail": 400, "tail_ms": 50, "repeats": 5},
    "f": {"cancels": 200, "concurrency": 10},
    "g": {"clients": 1000, "runs": 10},
    "i": {"runs": 100, "readers": 1000, "tokens": 400, "interval_ms": 20, "storm_after": 50},
    "j": {"runs": [100, 300]},
    "k": {
        # One request at a time (the goal's: a user's resume or stop while the load streams),
        # then ten at a time; the first level's cancels leave 200 runs for the second's.
        "load_runs": 300,
        "pace": {"tokens": 400, "interval_ms": 50},
        "ramp_seconds": 2.0,
        "resumes": 200,
        "cancels": 100,
        "concurrency": [1, 10],
    },
    "l": {"clients": 500, "tokens": 200, "interval_ms": 20, "start_in_ms": 3000},
}
QUICK: dict[str, Any] = {
    "a": {"tokens": 2_000},
    "b": {"streams": 100, "tokens": 60, "interval_ms": 50, "ramp_seconds": 0.5, "sweep": []},
    "c": {"streams": [10, 100], "tokens_total": 10_000, "ramp_seconds": 0.2},
    "d": {"clients": 100, "tokens": 200, "start_in_ms": 1500},
    "e": {"history": 1_000, "tail": 100, "tail_ms": 50, "repeats": 2},
    "f": {"cancels": 10, "concurrency": 5},
    "g": {"clients": 100, "runs": 5},
    "i": {"runs": 20, "readers": 200, "tokens": 100, "interval_ms": 20, "storm_after": 20},
    "j": {"runs": [20]},
    "k": {
        "load_runs": 20,
        "pace": {"tokens": 200, "interval_ms": 50},
        "ramp_seconds": 0.5,
        "resumes": 20,
        "cancels": 5,
        "concurrency": [1, 5],
    },
    "l": {"clients": 50, "tokens": 50, "interval_ms": 20, "start_in_ms": 1500},
}
SCENARIOS = "abcdefgijkl"
REPETITIONS = {"full": 3, "quick": 1}
"""Each measured figure is the median of this many runs of its scenario, with its spread."""


def run_loadgen(
    spec: dict[str, Any],
    on_ready: Callable[[], None] | None = None,
    module: str = "bench.loadgen",
) -> Any:
    """Run one scenario in a load-generator process; its parsed result."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(spec) + "\n")
    proc.stdin.flush()
    result: Any = None
    for line in proc.stdout:
        if line.startswith("READY"):
            if on_ready is not None:
                on_ready()
            proc.stdin.write("\n")
            proc.stdin.flush()
        elif line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
    if proc.wait(timeout=60) != 0 or result is None:
        raise RuntimeError(f"{module} failed on {spec.get('scenario')} ({proc.returncode})")
    return result


def _cpu(procs: dict[str, list[psutil.Process]]) -> dict[str, dict[int, float]]:
    """CPU seconds of each role's processes, by pid."""
    out: dict[str, dict[int, float]] = {}
    for name, members in procs.items():
        tree: dict[int, float] = {}
        for proc in members:
            try:
                t = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            # Reaped children's time is in their parent's children_* fields.
            tree[proc.pid] = t.user + t.system + t.children_user + t.children_system
        out[name] = tree
    return out


def cpu_figures(
    before: dict[str, dict[int, float]],
    after: dict[str, dict[int, float]],
    wall: float,
    tokens: int | None,
) -> dict[str, Any]:
    """Each role's CPU over a scenario and their sum: percent of a core, seconds, microseconds
    per delivered token, and delivered tokens per CPU-second."""
    seconds = {
        role: sum(cpu - before.get(role, {}).get(pid, 0.0) for pid, cpu in tree.items())
        for role, tree in after.items()
    }
    seconds["total"] = sum(seconds.values())
    out: dict[str, Any] = {
        "cpu_percent": {k: 100 * v / wall for k, v in seconds.items()},
        "cpu_seconds": seconds,
    }
    if tokens:
        out["cpu_us_per_token"] = {k: 1e6 * v / tokens for k, v in seconds.items()}
        if seconds["total"] > 0:
            out["tokens_per_cpu_second"] = tokens / seconds["total"]
    return out


def measured_once(system: Running, spec: dict[str, Any]) -> dict[str, Any]:
    """A scenario's result plus the CPU of every process of the system and the Redis commands
    it cost."""
    procs = system.processes()
    cpu0, calls0, t0 = _cpu(procs), system.redis_calls(), time.monotonic()
    result = run_loadgen({"system": system.name, "url": system.url, **spec})
    if "failed" in result:
        result["server_log"] = system.log_tail()
        print(f"  {spec['scenario']} failed: {result['failed']}", flush=True)
        return dict(result)
    wall = time.monotonic() - t0
    if result.get("error_count"):
        result["server_log"] = system.log_tail()
    cpu1, calls1 = _cpu(procs), system.redis_calls()
    result.update(
        cpu_figures(cpu0, cpu1, wall, result.get("delivered_tokens", result.get("tokens")))
    )
    result["api_rss_mb"] = system.server.memory_info().rss / 2**20
    result["redis_commands"] = calls1 - calls0
    if result.get("tokens"):
        result["redis_commands_per_token"] = (calls1 - calls0) / result["tokens"]
    return result


def combine(runs: list[Any]) -> tuple[Any, Any]:
    """Repetitions of one result as one: each number's median, and beside it its spread
    ``[min, median, max]`` in a tree of the same shape (None where nothing varies)."""
    first = runs[0]
    if all(isinstance(r, int | float) and not isinstance(r, bool) for r in runs):
        ordered = sorted(runs)
        median = ordered[len(ordered) // 2]
        return median, [ordered[0], median, ordered[-1]]
    if all(isinstance(r, dict) for r in runs):
        value: dict[str, Any] = {}
        spread: dict[str, Any] = {}
        for key in first:
            present = [r[key] for r in runs if key in r]
            if key == "errors":  # every repetition's, not the median one's
                value[key] = [e for r in present for e in r][:10]
                continue
            if key == "error_count":
                value[key] = sum(present)
                continue
            value[key], sub = combine(present)
            if sub is not None:
                spread[key] = sub
        return value, spread or None
    return first, None


def measured(system: Running, spec: dict[str, Any], repetitions: int = 1) -> dict[str, Any]:
    """`measured_once` `repetitions` times: medians, with each figure's spread under `spread`."""
    return repeated(lambda: measured_once(system, spec), repetitions)


def repeated(measure: Callable[[], dict[str, Any]], repetitions: int) -> dict[str, Any]:
    """`measure` `repetitions` times (stopping at a failure): medians, with each figure's spread
    under `spread`."""
    runs = []
    for _ in range(repetitions):
        runs.append(measure())
        if "failed" in runs[-1]:
            return runs[-1]
    return combined(runs)


def paired(
    load: Callable[[], dict[str, Any]], alone: Callable[[], dict[str, Any]], repetitions: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`load` then `alone`, alternated `repetitions` times, each combined as `repeated` does;
    each repetition of `load` also gets its all-process CPU per token over that of the `alone`
    run right after it (`cpu_ratio_to_astream`), so the ratio's median and spread are of pairs
    measured together."""
    loads: list[dict[str, Any]] = []
    alones: list[dict[str, Any]] = []
    for _ in range(repetitions):
        loads.append(load())
        if "failed" in loads[-1]:
            return loads[-1], {"failed": "not run: the load it is paired with failed"}
        alones.append(alone())
        mine = loads[-1].get("cpu_us_per_token", {}).get("total")
        theirs = alones[-1].get("cpu_us_per_token", {}).get("total")
        if mine and theirs:
            loads[-1]["cpu_ratio_to_astream"] = mine / theirs
    return combined(loads), combined(alones)


def combined(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Repetitions as one result: medians, with each figure's spread under `spread`."""
    repetitions = len(runs)
    result, spread = combine(runs)
    result["repetitions"] = repetitions
    result["spread"] = spread or {}
    if "expected_tokens" in result:
        result["incomplete_repetitions"] = sum(
            1 for r in runs if r.get("tokens") != r.get("expected_tokens")
        )
    return dict(result)


def idle_memory(system: Running, spec: dict[str, Any]) -> dict[str, Any]:
    before = system.server.memory_info().rss
    seen: dict[str, int] = {}

    def on_ready() -> None:
        seen["rss"] = system.server.memory_info().rss

    result = run_loadgen({"system": system.name, "url": system.url, **spec}, on_ready)
    if "failed" in result or "rss" not in seen:
        result["server_log"] = system.log_tail()
        return dict(result)
    result["rss_before_mb"] = before / 2**20
    result["rss_open_mb"] = seen["rss"] / 2**20
    result["kb_per_connection"] = (seen["rss"] - before) / 1024 / spec["clients"]
    return result


def timeout_for(tokens: int, interval_ms: float, slack: float = 120) -> float:
    return tokens * interval_ms / 1000 + slack


ONLY = {
    "resumable-stream": "abcdefgl",
    "resumable-stream-resumed": "bci",
    "tokenrelay-protocol": "abcd",
    "tokenrelay-dev": "j",
    "langgraph-dev": "j",
}
"""Systems that differ from another only in some scenarios run just those. The join storm (i)
resumes mid-stream, which resumable-stream does only through `resumeExistingStream` (its
`-resumed` system); the `dev` commands serve only the demo chat graph (j)."""
DEFAULT = "abcdefgikl"


def scenarios_of(name: str) -> str:
    return ONLY.get(name, DEFAULT)


def run_demo_runs(name: str, sizes: dict[str, Any], repetitions: int) -> dict[str, Any]:
    """(j) each run count on a fresh server (langgraph-dev with as many jobs as runs)."""
    out: dict[str, Any] = {}
    for n in sizes["j"]["runs"]:
        with start(name, jobs=n) as system:
            # Warm up: imports, graph compilation, the first thread.
            spec = {"scenario": "demo_runs", "words": DEMO_WORDS, "delay_ms": DEMO_DELAY_MS}
            run_loadgen({"system": name, "url": system.url, **spec, "runs": 1, "timeout": 120})
            out[str(n)] = measured(system, {**spec, "runs": n, "timeout": 900}, repetitions)
    return out


def idle_memories(system: Running, spec: dict[str, Any], repetitions: int) -> dict[str, Any]:
    """(g) `repetitions` times: first on `system`, then each time on a fresh start of it (a
    repetition in the same server would reuse the memory the first one freed)."""
    done = 0

    def once() -> dict[str, Any]:
        nonlocal done
        done += 1
        if done == 1:
            return idle_memory(system, spec)
        with start(system.name) as fresh:
            warm_up(fresh)
            return idle_memory(fresh, spec)

    return repeated(once, repetitions)


def warm_up(system: Running) -> None:
    """Imports, graph compilation, connection pools."""
    warm = {"tokens": 20, "interval_ms": 5}
    run_loadgen({"system": system.name, "url": system.url, "scenario": "streams", "streams": 5,
                 "pace": warm, "timeout": 60})  # fmt: skip


def run_system(
    name: str, sizes: dict[str, Any], scenarios: str, repetitions: int = 1
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    scenarios = "".join(s for s in scenarios if s in scenarios_of(name))
    if "j" in scenarios:
        out["j"] = run_demo_runs(name, sizes, repetitions)
    if not scenarios.replace("j", ""):
        return out
    with start(name) as system:
        warm_up(system)
        # Idle memory first, before the load scenarios leave freed memory to reuse.
        if "g" in scenarios:
            spec = {"scenario": "idle", **sizes["g"], "timeout": 600}
            out["g"] = idle_memories(system, spec, repetitions)
        if "a" in scenarios:
            s = sizes["a"]
            pace = {"tokens": s["tokens"], "interval_ms": 0}
            out["a"] = measured(system, {"scenario": "streams", "streams": 1, "pace": pace,
                                         "timeout": 300}, repetitions)  # fmt: skip
        if "b" in scenarios:
            s = sizes["b"]
            pace = {"tokens": s["tokens"], "interval_ms": s["interval_ms"]}

            def streams(n: int) -> dict[str, Any]:
                return {
                    "scenario": "streams", "streams": n, "pace": pace,
                    "ramp_seconds": s["ramp_seconds"] * n / s["streams"],
                    "timeout": timeout_for(s["tokens"], s["interval_ms"]),
                }  # fmt: skip

            def paced(n: int) -> dict[str, Any]:
                return measured(system, streams(n), repetitions)

            # The same pace at fewer streams first (where latency starts to climb), before the
            # full load leaves a bigger heap behind.
            out["b_sweep"] = {str(n): paced(n) for n in s["sweep"]}
            if name == "tokenrelay":
                # The graph alone right after each repetition: the CPU goal's ratio is taken
                # pair by pair, so the machine's drift over a long run does not enter it.
                full = streams(s["streams"])
                out["b"], out["astream"] = paired(
                    lambda: measured_once(system, full), lambda: graph_alone_once(sizes),
                    repetitions,
                )  # fmt: skip
            else:
                out["b"] = paced(s["streams"])
        if "c" in scenarios:
            s = sizes["c"]
            out["c"] = {}
            for n in s["streams"]:
                pace = {"tokens": max(10, s["tokens_total"] // n), "interval_ms": 0}
                out["c"][str(n)] = measured(system, {
                    "scenario": "streams", "streams": n, "pace": pace,
                    "ramp_seconds": s["ramp_seconds"], "timeout": 600,
                }, repetitions)  # fmt: skip
        if "d" in scenarios:
            s = sizes["d"]
            pace = {"tokens": s["tokens"], "interval_ms": 0, "start_in_ms": s["start_in_ms"]}
            out["d"] = measured(system, {"scenario": "fanout", "clients": s["clients"],
                                         "pace": pace, "timeout": 600}, repetitions)  # fmt: skip
        if "l" in scenarios:
            s = sizes["l"]
            pace = {"tokens": s["tokens"], "interval_ms": s["interval_ms"],
                    "start_in_ms": s["start_in_ms"]}  # fmt: skip
            out["l"] = measured(system, {"scenario": "fanout", "clients": s["clients"],
                                         "pace": pace, "timeout": 600}, repetitions)  # fmt: skip
        if "e" in scenarios:
            out["e"] = measured(
                system, {"scenario": "resume", **sizes["e"], "timeout": 600}, repetitions
            )
        if "f" in scenarios and name == "tokenrelay":
            out["f"] = measured(
                system, {"scenario": "cancel", **sizes["f"], "timeout": 600}, repetitions
            )
        if "i" in scenarios:
            s = sizes["i"]
            pace = {"tokens": s["tokens"], "interval_ms": s["interval_ms"]}
            out["i"] = measured(system, {
                "scenario": "storm", "runs": s["runs"], "readers": s["readers"], "pace": pace,
                "storm_after": s["storm_after"],
                "timeout": timeout_for(s["tokens"], s["interval_ms"]),
            }, repetitions)  # fmt: skip
        if "k" in scenarios and name == "tokenrelay":
            out["k"] = measured(
                system, {"scenario": "under_load", **sizes["k"], "timeout": 600}, repetitions
            )
    return out


def commit() -> str | None:
    """The measured code's commit (`git rev-parse HEAD`), None outside a git checkout."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def dirty() -> bool:
    """Whether the checkout has changes the commit hash does not name."""
    try:
        done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                              cwd=ROOT, capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and bool(done.stdout.strip())


def graph_alone_once(sizes: dict[str, Any]) -> dict[str, Any]:
    """The paced chat graph run by LangGraph's `astream` in one process at the (b) load: what
    the graph itself costs per token, which the relay's all-process total is compared with."""
    s = sizes["b"]
    spec = {"streams": s["streams"], "ramp_seconds": s["ramp_seconds"],
            "pace": {"tokens": s["tokens"], "interval_ms": s["interval_ms"]}}  # fmt: skip
    return dict(run_loadgen(spec, module="bench.astream"))


PACKAGES = (
    "redis",
    "hiredis",
    "langgraph",
    "langchain-core",
    "fastapi",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "msgpack",
    "orjson",
    "pydantic",
)
"""The packages whose versions a run records: those on a token's way through the relay. CI and a
fresh install take their newest releases, so two runs may differ in them as well as in code."""


def package_versions() -> dict[str, str | None]:
    """The installed version of each of `PACKAGES` (None: not installed)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit(),
        "dirty": dirty(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="tokenrelay bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke check")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--out", type=Path, default=None,
                        help="results directory (default: docs/ for a full run, "
                             "./bench-results for --quick or a partial run)")  # fmt: skip
    parser.add_argument("--repetitions", type=int, default=None,
                        help="runs of each measured scenario, reported as median and spread "
                             "(default: 3, or 1 with --quick)")  # fmt: skip
    parser.add_argument("--into", type=Path, default=None,
                        help="a full run's results (docs/benchmarks.json): the systems run now "
                             "replace their columns there, and its docs are rewritten")  # fmt: skip
    parser.add_argument(
        "--why", default="", help="with --into: why those columns were run again (the report says)"
    )
    args = parser.parse_args(argv)
    if args.into is not None and (args.quick or not args.why):
        parser.error("--into takes a full run's columns and needs --why")

    sizes = QUICK if args.quick else FULL
    repetitions = args.repetitions or REPETITIONS["quick" if args.quick else "full"]
    # Only a whole run speaks for docs/: a partial one would replace its table with a few columns.
    whole = (
        not args.quick
        and set(args.systems) == set(SYSTEMS)
        and set(args.scenarios) == set(SCENARIOS)
    )
    out_dir = args.out or (ROOT / "docs" if whole else Path("bench-results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick, "sizes": sizes,
                               "repetitions": repetitions, "systems": {},
                               "skipped": {}}  # fmt: skip
    started = time.monotonic()
    for name in args.systems:
        if not set(args.scenarios) & set(scenarios_of(name)):
            continue
        why = available(name)
        if why is not None:
            results["skipped"][name] = why
            print(f"{name}: skipped ({why})", flush=True)
            continue
        t0 = time.monotonic()
        print(f"{name}: {DESCRIPTIONS[name]}", flush=True)
        results["systems"][name] = run_system(name, sizes, "".join(args.scenarios), repetitions)
        if "astream" in results["systems"][name]:  # run beside tokenrelay's (b) load
            results["astream"] = results["systems"][name].pop("astream")
        print(f"{name}: done in {time.monotonic() - t0:.0f}s", flush=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "benchmarks-partial.json").write_text(json.dumps(results, indent=1) + "\n")
    results["seconds"] = time.monotonic() - started

    (out_dir / "benchmarks-partial.json").unlink(missing_ok=True)
    path = out_dir / ("benchmarks-quick.json" if args.quick else "benchmarks.json")
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(report.summary_table(results))
    if args.into is not None:
        merged = report.replace_columns(json.loads(args.into.read_text()), results, args.why)
        args.into.write_text(json.dumps(merged, indent=1) + "\n")
        report.write_docs(merged, args.into.parent)
    elif whole or (args.out is not None and not args.quick):
        report.write_docs(results, out_dir)
    print(f"results: {path} ({results['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
