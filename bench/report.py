# ruff: noqa: RUF001, RUF002, RUF003  (the tables typeset multiplication signs and en dashes)
"""Tables, goals and plots from a suite run (bench/suite.py)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

BEGIN = "<!-- side-by-side:begin (written by `tokenrelay bench`) -->"
END = "<!-- side-by-side:end -->"
OURS = ("tokenrelay", "tokenrelay-writer", "tokenrelay-protocol", "tokenrelay-dev")
PEERS = ("resumable-stream", "resumable-stream-resumed", "naive", "raw", "langgraph-dev")
COMPARED = ("resumable-stream", "resumable-stream-resumed", "naive")
PAIRS = (
    *((o, p) for o in OURS[:3] for p in COMPARED),
    ("tokenrelay-dev", "langgraph-dev"),
)
"""The ratio table's columns: each streaming variant against each peer, and the two `dev`
commands against each other."""
LABELS = {
    "tokenrelay": "tokenrelay (chat graph: the product)",
    "tokenrelay-writer": "tokenrelay-writer (the relay's own ceiling)",
}
"""Column heads: the chat-graph column is what users run; the writer column's producer costs
next to nothing, so it is the relay's own ceiling, never the product's figure."""

Getter = Callable[[dict[str, Any]], float | None]


def label(name: str) -> str:
    return LABELS.get(name, name)


def _walk(value: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


class Figure:
    """Reads one figure (the median of its repetitions) and its spread out of a system's
    results."""

    def __init__(self, *path: str) -> None:
        self.path = path

    def __call__(self, system: dict[str, Any]) -> float | None:
        value = _walk(system, self.path)
        return float(value) if isinstance(value, int | float) else None

    def spread(self, system: dict[str, Any]) -> tuple[float, float] | None:
        """(min, max) over the repetitions, when there were several."""
        head, rest = self.path[0], self.path[1:]
        # `c`, `b_sweep` and `j` hold one result (with its own spread) per size.
        if head in ("c", "b_sweep", "j") and rest:
            head, rest = f"{head}/{rest[0]}", rest[1:]
            scenario = _walk(system, tuple(head.split("/")))
        else:
            scenario = system.get(head)
        if not isinstance(scenario, dict) or scenario.get("repetitions", 1) < 2:
            return None
        found = _walk(scenario.get("spread"), rest)
        if isinstance(found, list) and len(found) == 3:
            return float(found[0]), float(found[2])
        return None


def _get(*path: str) -> Figure:
    return Figure(*path)


def _cpu_rows(scenario: str, *path: str) -> list[tuple[str, Getter, bool]]:
    """CPU per delivered token summed over every process of a system, tokens per CPU-second,
    and the per-process figures beside them."""
    where = f"({scenario})" if not path else f"({scenario}) {path[0]} streams:"
    at = (scenario, *path)
    return [
        (f"{where} CPU per delivered token, all processes (µs)",
         _get(*at, "cpu_us_per_token", "total"), False),
        (f"{where} tokens per CPU-second, all processes", _get(*at, "tokens_per_cpu_second"),
         True),
        *[(f"{where} CPU per token: {role} (µs)", _get(*at, "cpu_us_per_token", role), False)
          for role in ("api", "worker", "redis")],
    ]  # fmt: skip


def _under_load_rows(k: dict[str, Any]) -> list[tuple[str, Getter, bool]]:
    """(k) at each of its levels: one request at a time (the goal's), then several."""
    levels = k.get("concurrency") or [1]
    out: list[tuple[str, Getter, bool]] = []
    runs = int(k["load_runs"])
    for level in levels:
        at = "one request at a time" if level == 1 else f"{level} at a time"
        path = ("k", "levels", str(level))
        out += [
            (f"(k) under load ({runs} runs streaming), {at}: resume first token p50 (ms)",
             _get(*path, "resume", "p50_ms"), False),
            (f"(k) {at}: resume first token p99 (ms)", _get(*path, "resume", "p99_ms"), False),
        ]  # fmt: skip
    for n, level in enumerate(levels):
        at = "one request at a time" if level == 1 else f"{level} at a time"
        path = ("k", "levels", str(level))
        left = runs - n * int(k["cancels"])
        out += [
            (f"(k) under load ({left} runs streaming), {at}: cancel `wait=1`, partial kept, "
             "p50 (ms)", _get(*path, "cancel", "p50_ms"), False),
            (f"(k) {at}: cancel `wait=1`, partial kept, p99 (ms)",
             _get(*path, "cancel", "p99_ms"), False),
        ]  # fmt: skip
    return out


def rows(results: dict[str, Any]) -> list[tuple[str, Getter, bool]]:
    """(label, getter, higher is better) for each compared figure."""
    sizes = results["sizes"]
    b, c, d, e = sizes["b"], sizes["c"], sizes["d"], sizes["e"]
    i, j = sizes.get("i"), sizes.get("j")
    k = sizes.get("k") or {"load_runs": 300}
    l = sizes.get("l") or {"tokens": 200, "interval_ms": 20, "clients": 500}  # noqa: E741
    interval = b["interval_ms"]
    most = str(max(c["streams"]))
    storm: list[tuple[str, Getter, bool]] = (
        [
            (f"(i) join storm, {i['readers']:,} readers reconnecting at once to {i['runs']} "
             "live runs: readers served exactly", _get("i", "exact_readers"), True),
            ("(i) tokens missing or duplicated",
             lambda s: None if "i" not in s or "missing_tokens" not in s["i"]
             else float(s["i"]["missing_tokens"] + s["i"]["duplicate_tokens"]), False),
            ("(i) every reader caught up (ms)", _get("i", "all_caught_up_ms"), False),
            ("(i) reader caught up p50 (ms)", _get("i", "caught_up_ms", "p50"), False),
            ("(i) reader caught up p99 (ms)", _get("i", "caught_up_ms", "p99"), False),
            *_cpu_rows("i")[:2],
        ]
        if i
        else []
    )  # fmt: skip
    demo: list[tuple[str, Getter, bool]] = [
        row
        for n in (j or {}).get("runs", [])
        for row in (
            (f"(j) {n} demo runs at once (200 words, 20 ms apart): tokens/s",
             _get("j", str(n), "tokens_per_second"), True),
            (f"(j) {n} runs: run stretch p50 (×)", _get("j", str(n), "stretch", "p50"), False),
            (f"(j) {n} runs: run stretch p99 (×)", _get("j", str(n), "stretch", "p99"), False),
            (f"(j) {n} runs: CPU per delivered token, all processes (µs)",
             _get("j", str(n), "cpu_us_per_token", "total"), False),
            (f"(j) {n} runs: tokens per CPU-second", _get("j", str(n), "tokens_per_cpu_second"),
             True),
        )
    ]  # fmt: skip
    return [
        ("(a) 1 stream unpaced: tokens/s", _get("a", "tokens_per_second"), True),
        (f"(b) {b['streams']} streams × {1000 / interval:g} tok/s: latency p50 (ms)",
         _get("b", "latency_ms", "p50"), False),
        ("(b) latency p99 (ms)", _get("b", "latency_ms", "p99"), False),
        ("(b) latency p99.9 (ms)", _get("b", "latency_ms", "p999"), False),
        ("(b) steady state (all streams started): latency p50 (ms)",
         _get("b", "steady_latency_ms", "p50"), False),
        ("(b) steady state: latency p99 (ms)", _get("b", "steady_latency_ms", "p99"), False),
        ("(b) steady state, against the schedule (when each token was due): latency p50 (ms)",
         _get("b", "steady_schedule_latency_ms", "p50"), False),
        ("(b) steady state, against the schedule: latency p99 (ms)",
         _get("b", "steady_schedule_latency_ms", "p99"), False),
        *[(f"(b) the same pace at {n} streams: steady p99 (ms)",
           _get("b_sweep", str(n), "steady_latency_ms", "p99"), False)
          for n in b.get("sweep", [])],
        *[(f"(b) the same pace at {n} streams: steady p99 against the schedule (ms)",
           _get("b_sweep", str(n), "steady_schedule_latency_ms", "p99"), False)
          for n in b.get("sweep", [])],
        ("(b) API process CPU (%)", _get("b", "cpu_percent", "api"), False),
        ("(b) all processes CPU (% of one core)", _get("b", "cpu_percent", "total"), False),
        *_cpu_rows("b"),
        (f"(c) {most} streams unpaced: tokens/s", _get("c", most, "tokens_per_second"), True),
        *_cpu_rows("c", most)[:2],
        (f"(d) 1 stream × {d['clients']} clients: events/s delivered",
         _get("d", "events_per_second"), True),
        ("(d) latency p50 (ms)", _get("d", "latency_ms", "p50"), False),
        ("(d) latency p99 (ms)", _get("d", "latency_ms", "p99"), False),
        *_cpu_rows("d")[:2],
        (f"(l) 1 run paced ({l['tokens']} tokens, {l['interval_ms']} ms apart) × {l['clients']} "
         "readers joined at its start: latency p99 (ms)", _get("l", "latency_ms", "p99"), False),
        ("(l) latency p99 against the schedule (ms)", _get("l", "schedule_latency_ms", "p99"),
         False),
        ("(l) wall stretch: delivery span over the schedule's (×)", _get("l", "wall_stretch"),
         False),
        (f"(e) join a {e['history']:,}-event run from the start: first token (ms)",
         _get("e", "first_byte_ms"), False),
        ("(e) full replay (ms)", _get("e", "full_replay_ms"), False),
        ("(e) resume half way with Last-Event-ID: first token (ms)",
         _get("e", "resume_first_byte_ms"), False),
        ("(f) cancel `wait=1` p50 (ms)", _get("f", "p50_ms"), False),
        ("(f) cancel `wait=1` p99 (ms)", _get("f", "p99_ms"), False),
        *_under_load_rows(k),
        ("(g) server memory per idle SSE connection (KB)", _get("g", "kb_per_connection"), False),
        ("(h) Redis commands per token, in (b)", _get("b", "redis_commands_per_token"), False),
        (f"(h) Redis commands per token, in (c) at {most}",
         _get("c", most, "redis_commands_per_token"), False),
        *storm,
        *demo,
    ]  # fmt: skip


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if math.isinf(value):
        return "inf"
    if value == int(value) and abs(value) < 10:
        return str(int(value))  # a count, such as tokens missing
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ratio(ours: float | None, theirs: float | None, higher_better: bool) -> str:
    """How many times better tokenrelay is (>1 is better), whichever way the figure goes."""
    if ours is None or theirs is None or ours <= 0 or theirs <= 0:
        return "–"
    return f"{(ours / theirs if higher_better else theirs / ours):.2f}×"


def _cell(get: Getter, system: dict[str, Any]) -> str:
    """The figure's median, with its (min–max) over the repetitions when there were several."""
    text = _fmt(get(system))
    spread = get.spread(system) if isinstance(get, Figure) else None
    if spread is not None and text != "–":
        text += f" ({_fmt(spread[0])}–{_fmt(spread[1])})"
    return text


def summary_table(results: dict[str, Any]) -> str:
    """Each figure for each system, then how many times better each tokenrelay variant is."""
    systems = results["systems"]
    names = [n for n in (*OURS, *PEERS) if n in systems]
    figures = [r for r in rows(results) if any(r[1](systems[n]) is not None for n in names)]
    # A pair whose systems share no figure (the `dev` commands run only (j)) has no column.
    pairs = [
        (o, p)
        for o, p in PAIRS
        if o in systems
        and p in systems
        and any(get(systems[o]) is not None and get(systems[p]) is not None
                for _, get, _ in figures)
    ]  # fmt: skip

    def table(head: list[str], body: list[list[str]]) -> str:
        lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])

    values = table(
        ["figure", *(label(n) for n in names)],
        [[text, *(_cell(get, systems[n]) for n in names)] for text, get, _ in figures],
    )
    if not pairs:
        return values
    ratios = table(
        ["figure", *(f"{label(o)} vs {p}" for o, p in pairs)],
        [
            [text, *(_ratio(get(systems[o]), get(systems[p]), higher) for o, p in pairs)]
            for text, get, higher in figures
        ],
    )
    return values + "\n\nHow many times better tokenrelay is (medians):\n\n" + ratios


def goals(results: dict[str, Any]) -> list[tuple[str, list[str], list[bool | None]]]:
    """(goal, measured per tokenrelay variant, met per variant) for the project's targets."""
    systems = results["systems"]
    rs = systems.get("resumable-stream", {})
    rsr = systems.get("resumable-stream-resumed", {})
    most = str(max(results["sizes"]["c"]["streams"]))
    tps = _get("c", most, "tokens_per_second")

    def times(peer: dict[str, Any]) -> Getter:
        return lambda s: (tps(s) or 0) / (tps(peer) or 1) if tps(s) and tps(peer) else None

    sizes = results["sizes"]
    demo_runs = [str(n) for n in sizes.get("j", {}).get("runs", [])]
    lg = systems.get("langgraph-dev", {})
    dev_checks: list[tuple[str, Getter, Callable[[float], bool], str]] = []
    if demo_runs:
        most_runs, fewest_runs = demo_runs[-1], demo_runs[0]
        dev_tps = _get("j", most_runs, "tokens_per_second")
        lg_stretch = _fmt(_get("j", fewest_runs, "stretch", "p99")(lg))
        dev_checks = [
            (f"`tokenrelay dev` ≥ 5× `langgraph dev` tokens/s at {most_runs} runs",
             lambda s: (dev_tps(s) or 0) / (dev_tps(lg) or 1)
             if dev_tps(s) and dev_tps(lg) else None,
             lambda v: v >= 5, "×"),
            (f"run stretch p99 ≤ 1.3× at {fewest_runs} runs (`langgraph dev`: {lg_stretch}×)",
             _get("j", fewest_runs, "stretch", "p99"), lambda v: v <= 1.3, "×"),
        ]  # fmt: skip
    storm_checks: list[tuple[str, Getter, Callable[[float], bool], str]] = []
    if "i" in sizes:
        rsr_storm = _fmt(_get("i", "all_caught_up_ms")(rsr))
        storm_checks = [
            (f"join storm ({sizes['i']['readers']:,} readers, {sizes['i']['runs']} runs): "
             f"served exactly, all caught up ≤ 1 s (resumable-stream-resumed: {rsr_storm} ms; "
             "inf: a reader was not served exactly)",
             lambda s: None if "exact_readers" not in s.get("i", {})
             else _get("i", "all_caught_up_ms")(s) or math.inf
             if s["i"]["exact_readers"] == sizes["i"]["readers"] else math.inf,
             lambda v: v <= 1000, " ms"),
        ]  # fmt: skip
    join_checks: list[tuple[str, Getter, Callable[[float], bool], str]] = []
    if "l" in sizes:
        l_p99 = _get("l", "latency_ms", "p99")
        rs_skew = l_p99(rs)
        join_checks = [
            (f"{sizes['l']['clients']} readers joining one paced run at its start: latency p99 "
             f"≤ ¼ of resumable-stream's ({_fmt(rs_skew)} ms); the ratio",
             lambda s: (v / rs_skew) if (v := l_p99(s)) is not None and rs_skew else None,
             lambda v: v <= 0.25, "×"),
            ("the same: wall stretch ≤ 1.1", _get("l", "wall_stretch"), lambda v: v <= 1.1, "×"),
        ]  # fmt: skip
    sweep = [n for n in sizes["b"].get("sweep", []) if n == 250]
    alone = _get("cpu_us_per_token", "total")(results.get("astream", {}))
    cpu_checks: list[tuple[str, Getter, Callable[[float], bool], str]] = []
    if alone:
        pairs = _get("b", "cpu_ratio_to_astream")
        product = systems.get("tokenrelay", {})
        spread = pairs.spread(product)
        how = (
            f"; for the chat graph, the median of {product['b'].get('repetitions', 1)} pairs, "
            "each repetition of the load against `astream` run right after it"
            + (f" ({_fmt(spread[0])}–{_fmt(spread[1])}×)" if spread else "")
            if pairs(product) is not None
            else ""
        )

        def ratio(s: dict[str, Any]) -> float | None:
            if (paired := pairs(s)) is not None:
                return paired
            v = _get("b", "cpu_us_per_token", "total")(s)
            return v / alone if v else None

        cpu_checks = [
            ("CPU per delivered token at the (b) load, all processes, ≤ 1.5× the graph's own "
             f"(the same graph under LangGraph `astream` in one process: {_fmt(alone)} µs{how})",
             ratio, lambda v: v <= 1.5, "×"),
        ]  # fmt: skip

    checks: list[tuple[str, Getter, Callable[[float], bool], str]] = [
        (f"≥ 2× resumable-stream tokens/s at {most} streams (its creator reads)",
         times(rs), lambda v: v >= 2, "×"),
        (f"≥ 2× resumable-stream tokens/s at {most} streams (resumed readers)",
         times(rsr), lambda v: v >= 2, "×"),
        ("p99 added latency ≤ 10 ms at the (b) load, steady state",
         _get("b", "steady_latency_ms", "p99"),
         lambda v: v <= 10, " ms"),
        ("fan-out ≥ 100k events/s", _get("d", "events_per_second"),
         lambda v: v >= 100_000, " events/s"),
        ("resume first byte ≤ 20 ms", _get("e", "resume_first_byte_ms"), lambda v: v <= 20,
         " ms"),
        ("≤ 40 KB per idle connection", _get("g", "kb_per_connection"), lambda v: v <= 40,
         " KB"),
        ("under load, one at a time: resume first byte p99 ≤ 5 ms", _get("k", "resume", "p99_ms"),
         lambda v: v <= 5, " ms"),
        ("under load, one at a time: cancel `wait=1` p99 ≤ 15 ms, partial kept",
         _get("k", "cancel", "p99_ms"),
         lambda v: v <= 15, " ms"),
        (f"full replay of a {sizes['e']['history']:,}-event run ≤ 30 ms",
         _get("e", "full_replay_ms"),
         lambda v: v <= 30, " ms"),
        *[(f"p99 added latency ≤ 10 ms at {n} streams × {1000 / sizes['b']['interval_ms']:g} "
           "tok/s, steady state", _get("b_sweep", str(n), "steady_latency_ms", "p99"),
           lambda v: v <= 10, " ms") for n in sweep],
        *cpu_checks,
        *storm_checks,
        *join_checks,
        *dev_checks,
    ]  # fmt: skip
    out = []
    variants = [systems[o] for o in OURS if o in systems]
    for goal, get, ok, unit in checks:
        values = [get(v) for v in variants]
        out.append((
            goal,
            # "–": this variant does not run the goal's scenario (failures are listed apart).
            [_fmt(v) + unit if v is not None else "–" for v in values],
            [ok(v) if v is not None else None for v in values],
        ))  # fmt: skip
    return out


Series = dict[str, list[tuple[float, float]]]


def _chart(series: Series, path: Path, title: str, xlabel: str, ylabel: str, logy: bool) -> Path:
    """One line per system on log x (and optionally log y) axes, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, points in series.items():
        if points:
            ax.plot(*zip(*points, strict=True), marker="o" if len(points) < 20 else "",
                    label=name)  # fmt: skip
    ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(results: dict[str, Any], out_dir: Path) -> list[Path]:
    systems = results["systems"]
    names = [n for n in (*OURS, *PEERS) if n in systems]
    b = results["sizes"]["b"]
    rate = f"{1000 / b['interval_ms']:g}"
    img = out_dir / "img"

    def cdf(name: str) -> list[tuple[float, float]]:
        values = systems[name].get("b", {}).get("latency_cdf_ms") or []
        return [(max(v, 0.01), i / len(values)) for i, v in enumerate(values)]

    def throughput(name: str) -> list[tuple[float, float]]:
        got = systems[name]
        points = [(1.0, got.get("a", {}).get("tokens_per_second"))]
        points += [(float(n), r.get("tokens_per_second")) for n, r in got.get("c", {}).items()]
        return sorted((x, y) for x, y in points if y)

    def p99_by_load(name: str) -> list[tuple[float, float]]:
        got = systems[name]
        runs = [*got.get("b_sweep", {}).items(), (str(b["streams"]), got.get("b", {}))]
        points = [(float(n), r.get("steady_latency_ms", {}).get("p99")) for n, r in runs]
        return sorted((x, y) for x, y in points if y)

    return [
        _chart({n: cdf(n) for n in names}, img / "bench-latency-cdf.png",
               f"(b) {b['streams']} streams × {rate} tokens/s",
               "latency, production to receipt (ms, log)", "fraction of tokens", logy=False),
        _chart({n: throughput(n) for n in names}, img / "bench-throughput.png",
               "Throughput vs streams", "concurrent streams, one reader each, unpaced",
               "tokens/s delivered", logy=True),
        _chart({n: p99_by_load(n) for n in names}, img / "bench-latency-vs-streams.png",
               "Latency vs load", f"concurrent streams at {rate} tokens/s each",
               "steady-state p99 latency (ms)", logy=True),
    ]  # fmt: skip


def _short_error(text: str) -> str:
    """A client error as one short phrase (an HTTP status rather than aiohttp's whole repr)."""
    status = re.search(r"status=(\d+), message='([^']*)'", text)
    return f"HTTP {status[1]} {status[2]}" if status else text[:160]


def failures(results: dict[str, Any]) -> list[str]:
    out = []
    for name, scenarios in results["systems"].items():
        for key, value in scenarios.items():
            # `c`, `b_sweep` and `j` hold one result per stream or run count.
            nested = value.items() if key in ("c", "b_sweep", "j") else [("", value)]
            for sub, result in nested:
                if not isinstance(result, dict):
                    continue
                if "failed" in result:
                    out.append(f"{name} ({key}{sub}): {result['failed']}")
                elif result.get("incomplete_repetitions"):
                    # Its figures count only what the clients that were served received.
                    first = _short_error(str((result.get("errors") or ["none recorded"])[0]))
                    out.append(
                        f"{name} ({key}{sub}): {result['incomplete_repetitions']} of "
                        f"{result.get('repetitions', 1)} repetitions delivered fewer tokens "
                        f"than expected ({result.get('error_count', 0)} client errors; the "
                        f"first: {first}); its figures count only the tokens "
                        "delivered"
                    )
    return out


def section(results: dict[str, Any]) -> str:
    m = results["machine"]
    skipped = "".join(f"\n- {n}: not run ({why})" for n, why in results["skipped"].items())
    skipped += "".join(f"\n- failed: {f}" for f in failures(results))
    variants = [o for o in OURS if o in results["systems"]]

    def verdict(value: str, ok: bool | None) -> str:
        return value if ok is None else f"{value} ({'met' if ok else 'not met'})"

    goal_lines = "\n".join(
        "| " + " | ".join([g, *(verdict(v, ok) for v, ok in zip(vals, oks, strict=True))]) + " |"
        for g, vals, oks in goals(results)
    )
    heads = [label(v) for v in variants]
    goal_head = "| goal | " + " | ".join(heads) + " |\n|---" + "|---" * len(variants) + "|"
    reps = int(results.get("repetitions", 1))
    commit = m.get("commit") or "unknown"
    if m.get("dirty"):
        commit += " plus uncommitted changes"
    spread = (
        f" Each figure is the median of {reps} runs of its scenario, with the lowest and highest "
        "in brackets; ratios compare medians."
        if reps > 1
        else " Each scenario ran once."
    )
    return f"""{BEGIN}
## Side by side: tokenrelay, resumable-stream, a naive baseline, the raw ceiling, the Agent Server

One run of `tokenrelay bench` on {m["date"]} at commit `{commit}` ({m["cpus"]} cores, Python
{m["python"]}, the load generator, every server and redis-server sharing them),
{results["seconds"]:.0f} s in all.{spread}
Each system ran in its own processes on a fresh redis-server with the same payload
(`ts<monotonic_ns> du<monotonic_ns> n<index>` plus 16 filler characters per token) and the same
pacing; the load generator (`bench/loadgen.py`, aiohttp) ran in a process of its own. Latency is
the token's receipt time minus the time its producer made it; latency against the schedule is
the receipt time minus the time the token was due by its pace, so it also counts a producer that
fell behind. Both are read from CLOCK_MONOTONIC, which every process on the machine shares. CPU
per delivered token adds up every process of a system (API, worker, Redis, the Node server, each
with its children) over the scenario, the load generator excluded. The chat-graph column is the
product; the writer column's producer costs next to nothing, so it is the relay's own ceiling.
Ratios are "times better for tokenrelay" whichever way a figure goes. Raw numbers:
`docs/benchmarks.json`.{_replaced(results)}{skipped}

{summary_table(results)}

![latency CDF](img/bench-latency-cdf.png)
![throughput vs streams](img/bench-throughput.png)
![latency vs load](img/bench-latency-vs-streams.png)

Goals:

{goal_head}
{goal_lines}
{END}"""


def replace_columns(full: dict[str, Any], rerun: dict[str, Any], why: str) -> dict[str, Any]:
    """`full` (a full run's results) with the systems of `rerun` (a later run of some of them,
    and of `astream` if it ran) in place of its own, each replacement recorded with its date,
    commit and `why`, which the report states above the table."""
    m = rerun["machine"]
    out = {**full, "systems": {**full["systems"]}, "replaced": dict(full.get("replaced", {}))}
    names = [*rerun["systems"], *(["astream"] if "astream" in rerun else [])]
    for name in names:
        if name == "astream":
            out["astream"] = rerun["astream"]
        else:
            out["systems"][name] = rerun["systems"][name]
        out["replaced"][name] = {
            "date": m["date"], "commit": m.get("commit"), "seconds": rerun["seconds"], "why": why,
        }  # fmt: skip
    return out


def _replaced(results: dict[str, Any]) -> str:
    """What the report says above the table of columns run again: one sentence per later run
    (its date, commit, length and why), naming the columns it replaced."""
    replaced = results.get("replaced") or {}
    runs: dict[tuple[str, str, float, str], list[str]] = {}
    for name, r in replaced.items():
        key = (r["date"], r["commit"] or "unknown", r["seconds"], r["why"])
        runs.setdefault(key, []).append(name)
    out = ""
    for (date, commit, seconds, why), names in runs.items():
        quoted = [f"`{n}`" for n in names]
        listed = " and ".join([", ".join(quoted[:-1]), quoted[-1]] if len(quoted) > 1 else quoted)
        out += (
            f"\n\nThe figures of {listed} are from a second run of those alone, on {date} at "
            f"commit `{commit}` ({seconds:.0f} s), in place of this run's: {why}"
        )
    return out


def write_docs(results: dict[str, Any], out_dir: Path) -> None:
    plot(results, out_dir)
    doc = out_dir / "benchmarks.md"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    new = section(results)
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: new, text, flags=re.S)
    else:
        head, _, rest = text.partition("\n## ")
        text = f"{head.rstrip()}\n\n{new}\n\n## {rest}" if rest else f"{text.rstrip()}\n\n{new}\n"
    doc.write_text(text)
