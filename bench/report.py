# ruff: noqa: RUF001  (the tables typeset multiplication signs and en dashes)
"""Tables, goals and plots from a suite run (bench/suite.py)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

BEGIN = "<!-- side-by-side:begin (written by `tokenrelay bench`) -->"
END = "<!-- side-by-side:end -->"
PEERS = ("resumable-stream", "naive", "raw")

Getter = Callable[[dict[str, Any]], float | None]


def _get(*path: str) -> Getter:
    def get(system: dict[str, Any]) -> float | None:
        value: Any = system
        for key in path:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return float(value) if isinstance(value, int | float) else None

    return get


def rows(results: dict[str, Any]) -> list[tuple[str, Getter, bool]]:
    """(label, getter, higher is better) for each compared figure."""
    sizes = results["sizes"]
    b, c, d, e = sizes["b"], sizes["c"], sizes["d"], sizes["e"]
    interval = b["interval_ms"]
    most = str(max(c["streams"]))
    return [
        ("(a) 1 stream unpaced: tokens/s", _get("a", "tokens_per_second"), True),
        (f"(b) {b['streams']} streams × {1000 / interval:g} tok/s: latency p50 (ms)",
         _get("b", "latency_ms", "p50"), False),
        ("(b) latency p99 (ms)", _get("b", "latency_ms", "p99"), False),
        ("(b) latency p99.9 (ms)", _get("b", "latency_ms", "p999"), False),
        ("(b) API process CPU (%)", _get("b", "cpu_percent", "api"), False),
        (f"(c) {most} streams unpaced: tokens/s", _get("c", most, "tokens_per_second"), True),
        (f"(d) 1 stream × {d['clients']} clients: events/s delivered",
         _get("d", "events_per_second"), True),
        (f"(e) join a {e['history']:,}-event run from the start: first token (ms)",
         _get("e", "first_byte_ms"), False),
        ("(e) full replay (ms)", _get("e", "full_replay_ms"), False),
        ("(e) resume half way with Last-Event-ID: first token (ms)",
         _get("e", "resume_first_byte_ms"), False),
        ("(f) cancel `wait=1` p50 (ms)", _get("f", "p50_ms"), False),
        ("(f) cancel `wait=1` p99 (ms)", _get("f", "p99_ms"), False),
        ("(g) server memory per idle SSE connection (KB)", _get("g", "kb_per_connection"), False),
        ("(h) Redis commands per token, in (b)", _get("b", "redis_commands_per_token"), False),
        (f"(h) Redis commands per token, in (c) at {most}",
         _get("c", most, "redis_commands_per_token"), False),
    ]  # fmt: skip


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
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


def summary_table(results: dict[str, Any]) -> str:
    systems = results["systems"]
    names = [n for n in ("tokenrelay", *PEERS) if n in systems]
    ours = systems.get("tokenrelay", {})
    peers = [p for p in ("resumable-stream", "naive") if p in systems and ours]
    head = ["figure", *names, *(f"tokenrelay vs {p}" for p in peers)]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for label, get, higher in rows(results):
        values = [get(systems[n]) for n in names]
        if all(v is None for v in values):
            continue
        ratios = [_ratio(get(ours), get(systems[p]), higher) for p in peers]
        lines.append("| " + " | ".join([label, *map(_fmt, values), *ratios]) + " |")
    return "\n".join(lines)


def goals(results: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(goal, measured, met) for the project's targets."""
    systems = results["systems"]
    ours = systems.get("tokenrelay", {})
    rs = systems.get("resumable-stream", {})
    most = str(max(results["sizes"]["c"]["streams"]))
    out: list[tuple[str, str, bool | None]] = []

    def add(goal: str, value: float | None, ok: Callable[[float], bool], text: str) -> None:
        out.append((goal, text if value is not None else "not measured",
                    ok(value) if value is not None else None))  # fmt: skip

    tps = _get("c", most, "tokens_per_second")
    ours_tps, rs_tps = tps(ours), tps(rs)
    ratio = ours_tps / rs_tps if ours_tps and rs_tps else None
    add(
        f"≥ 2× resumable-stream tokens/s at {most} streams",
        ratio,
        lambda v: v >= 2,
        f"{_fmt(ours_tps)} vs {_fmt(rs_tps)} tokens/s = {_fmt(ratio)}×",
    )
    p99 = _get("b", "latency_ms", "p99")(ours)
    add("p99 added latency ≤ 10 ms at the (b) load", p99, lambda v: v <= 10, f"{_fmt(p99)} ms")
    fan = _get("d", "events_per_second")(ours)
    add("fan-out ≥ 100k events/s", fan, lambda v: v >= 100_000, f"{_fmt(fan)} events/s")
    first = _get("e", "resume_first_byte_ms")(ours)
    add("resume first byte ≤ 20 ms", first, lambda v: v <= 20, f"{_fmt(first)} ms")
    idle = _get("g", "kb_per_connection")(ours)
    add("≤ 40 KB per idle connection", idle, lambda v: v <= 40, f"{_fmt(idle)} KB")
    return out  # fmt: skip


def plot(results: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = results["systems"]
    names = [n for n in ("tokenrelay", *PEERS) if n in systems]
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in names:
        cdf = systems[name].get("b", {}).get("latency_cdf_ms") or []
        if cdf:
            ys = [i / len(cdf) for i in range(len(cdf))]
            ax.plot([max(v, 0.01) for v in cdf], ys, label=name)
    b = results["sizes"]["b"]
    ax.set_xscale("log")
    ax.set_xlabel("latency, production to receipt (ms, log)")
    ax.set_ylabel("fraction of tokens")
    ax.set_title(f"(b) {b['streams']} streams × {1000 / b['interval_ms']:g} tokens/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "img" / "bench-latency-cdf.png")
    paths[-1].parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in names:
        sys_ = systems[name]
        points = []
        if sys_.get("a", {}).get("tokens_per_second"):
            points.append((1, sys_["a"]["tokens_per_second"]))
        for n, r in sorted(sys_.get("c", {}).items(), key=lambda kv: int(kv[0])):
            if r.get("tokens_per_second"):
                points.append((int(n), r["tokens_per_second"]))
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("concurrent streams, one reader each, unpaced")
    ax.set_ylabel("tokens/s delivered")
    ax.set_title("Throughput vs streams")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "img" / "bench-throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def section(results: dict[str, Any]) -> str:
    m = results["machine"]
    skipped = "".join(f"\n- {n}: not run ({why})" for n, why in results["skipped"].items())
    goal_lines = "\n".join(
        f"| {g} | {v} | {'met' if ok else 'not met' if ok is False else '–'} |"
        for g, v, ok in goals(results)
    )
    return f"""{BEGIN}
## Side by side: tokenrelay, resumable-stream, a naive baseline, the raw ceiling

One run of `tokenrelay bench` on {m["date"]} ({m["cpus"]} cores, Python {m["python"]}, the
load generator, every server and redis-server sharing them), {results["seconds"]:.0f} s in all.
Each system ran in its own processes on a fresh redis-server with the same payload (`ts<time_ns>`
plus 16 filler characters per token) and the same pacing; the load generator
(`bench/loadgen.py`, aiohttp) ran in a process of its own. Latency is the token's receipt time
minus the time its producer made it, on the machine's one clock. Ratios are "times better for
tokenrelay" whichever way a figure goes. Raw numbers: `docs/benchmarks.json`.{skipped}

{summary_table(results)}

![latency CDF](img/bench-latency-cdf.png)
![throughput vs streams](img/bench-throughput.png)

Goals:

| goal | measured (tokenrelay) | |
|---|---|---|
{goal_lines}
{END}"""


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
