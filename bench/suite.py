"""The side-by-side suite: tokenrelay, Vercel resumable-stream, a naive baseline and the raw
ceiling, run one after another on this machine with the same payload and pacing.

Each system runs in its own processes on a fresh redis-server; the load generator
(bench/loadgen.py) runs in another. Results go to JSON; the full run also rewrites the
side-by-side section of docs/benchmarks.md and its plots.

    tokenrelay bench --quick              # smoke check, under 2 minutes
    tokenrelay bench                      # the full suite; updates docs/benchmarks.md
    tokenrelay bench --systems tokenrelay naive --scenarios b c
"""

from __future__ import annotations

import argparse
import datetime
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
from bench.systems import DESCRIPTIONS, SYSTEMS, Running, available, start

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
}
QUICK: dict[str, Any] = {
    "a": {"tokens": 2_000},
    "b": {"streams": 100, "tokens": 60, "interval_ms": 50, "ramp_seconds": 0.5, "sweep": []},
    "c": {"streams": [10, 100], "tokens_total": 10_000, "ramp_seconds": 0.2},
    "d": {"clients": 100, "tokens": 200, "start_in_ms": 1500},
    "e": {"history": 1_000, "tail": 100, "tail_ms": 50, "repeats": 2},
    "f": {"cancels": 10, "concurrency": 5},
    "g": {"clients": 100, "runs": 5},
}
SCENARIOS = "abcdefg"


def run_loadgen(spec: dict[str, Any], on_ready: Callable[[], None] | None = None) -> Any:
    """Run one scenario in a load-generator process; its parsed result."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.loadgen"],
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
        raise RuntimeError(f"load generator failed on {spec['scenario']} ({proc.returncode})")
    return result


def _cpu(procs: dict[str, psutil.Process]) -> dict[str, float]:
    out = {}
    for name, proc in procs.items():
        times = proc.cpu_times()
        out[name] = times.user + times.system
    return out


def measured(system: Running, spec: dict[str, Any]) -> dict[str, Any]:
    """A scenario's result plus the servers' CPU and the Redis commands it cost."""
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
    result["cpu_percent"] = {k: 100 * (cpu1[k] - cpu0[k]) / wall for k in procs}
    result["api_rss_mb"] = system.server.memory_info().rss / 2**20
    result["redis_commands"] = calls1 - calls0
    if result.get("tokens"):
        result["redis_commands_per_token"] = (calls1 - calls0) / result["tokens"]
    return result


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


ONLY = {"resumable-stream-resumed": "bc", "tokenrelay-protocol": "abcd"}
"""Systems that differ from another only in some scenarios run just those."""


def run_system(name: str, sizes: dict[str, Any], scenarios: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    scenarios = "".join(s for s in scenarios if s in ONLY.get(name, SCENARIOS))
    with start(name) as system:
        # Warm up: imports, graph compilation, connection pools.
        warm = {"tokens": 20, "interval_ms": 5}
        run_loadgen({"system": name, "url": system.url, "scenario": "streams", "streams": 5,
                     "pace": warm, "timeout": 60})  # fmt: skip
        # Idle memory first, before the load scenarios leave freed memory to reuse.
        if "g" in scenarios:
            out["g"] = idle_memory(system, {"scenario": "idle", **sizes["g"], "timeout": 600})
        if "a" in scenarios:
            s = sizes["a"]
            pace = {"tokens": s["tokens"], "interval_ms": 0}
            out["a"] = measured(system, {"scenario": "streams", "streams": 1, "pace": pace,
                                         "timeout": 300})  # fmt: skip
        if "b" in scenarios:
            s = sizes["b"]
            pace = {"tokens": s["tokens"], "interval_ms": s["interval_ms"]}

            def paced(n: int) -> dict[str, Any]:
                return measured(system, {
                    "scenario": "streams", "streams": n, "pace": pace,
                    "ramp_seconds": s["ramp_seconds"] * n / s["streams"],
                    "timeout": timeout_for(s["tokens"], s["interval_ms"]),
                })  # fmt: skip

            # The same pace at fewer streams first (where latency starts to climb), before the
            # full load leaves a bigger heap behind.
            out["b_sweep"] = {str(n): paced(n) for n in s["sweep"]}
            out["b"] = paced(s["streams"])
        if "c" in scenarios:
            s = sizes["c"]
            out["c"] = {}
            for n in s["streams"]:
                pace = {"tokens": max(10, s["tokens_total"] // n), "interval_ms": 0}
                out["c"][str(n)] = measured(system, {
                    "scenario": "streams", "streams": n, "pace": pace,
                    "ramp_seconds": s["ramp_seconds"], "timeout": 600,
                })  # fmt: skip
        if "d" in scenarios:
            s = sizes["d"]
            pace = {"tokens": s["tokens"], "interval_ms": 0, "start_in_ms": s["start_in_ms"]}
            out["d"] = measured(system, {"scenario": "fanout", "clients": s["clients"],
                                         "pace": pace, "timeout": 600})  # fmt: skip
        if "e" in scenarios:
            out["e"] = measured(system, {"scenario": "resume", **sizes["e"], "timeout": 600})
        if "f" in scenarios and name == "tokenrelay":
            out["f"] = measured(system, {"scenario": "cancel", **sizes["f"], "timeout": 600})
    return out


def machine() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
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
                             "./bench-results for --quick)")  # fmt: skip
    args = parser.parse_args(argv)

    sizes = QUICK if args.quick else FULL
    out_dir = args.out or (Path("bench-results") if args.quick else ROOT / "docs")
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick, "sizes": sizes,
                               "systems": {}, "skipped": {}}  # fmt: skip
    started = time.monotonic()
    for name in args.systems:
        why = available(name)
        if why is not None:
            results["skipped"][name] = why
            print(f"{name}: skipped ({why})", flush=True)
            continue
        t0 = time.monotonic()
        print(f"{name}: {DESCRIPTIONS[name]}", flush=True)
        results["systems"][name] = run_system(name, sizes, "".join(args.scenarios))
        print(f"{name}: done in {time.monotonic() - t0:.0f}s", flush=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "benchmarks-partial.json").write_text(json.dumps(results, indent=1) + "\n")
    results["seconds"] = time.monotonic() - started

    (out_dir / "benchmarks-partial.json").unlink(missing_ok=True)
    path = out_dir / ("benchmarks-quick.json" if args.quick else "benchmarks.json")
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(report.summary_table(results))
    if not args.quick:
        report.write_docs(results, out_dir)
    print(f"results: {path} ({results['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
