"""`tokenrelay bench --quick`: every system and scenario runs and delivers what it should.

Nothing here is about speed (figures belong in docs/benchmarks.md); this keeps the suite
itself working: the peers start, the load generator reads every token of every stream.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.suite import scenarios_of
from bench.systems import SYSTEMS

STREAMING = [s for s in SYSTEMS if not s.endswith("-dev")]
"""The systems that run the streaming scenarios (a-i); the `dev` commands run only (j)."""


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
    done = subprocess.run(
        [sys.executable, "-m", "tokenrelay.producer.cli", "bench", "--quick", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data: dict[str, Any] = json.loads((out / "benchmarks-quick.json").read_text())
    assert "| (b) latency p99 (ms) |" in done.stdout  # the summary table was printed
    return data


@pytest.mark.timeout(420)
def test_every_system_ran(results: dict[str, Any]) -> None:
    # Only the official server may be skipped: its virtualenv needs PyPI once. The reason is
    # recorded.
    assert set(results["skipped"]) <= {"langgraph-dev"}
    assert all(results["skipped"].values())
    assert set(results["systems"]) | set(results["skipped"]) == set(SYSTEMS)
    assert len(results["machine"]["commit"]) == 40
    packages = results["machine"]["packages"]
    assert packages["langgraph"] and packages["redis"] and packages["uvicorn"]
    assert results["repetitions"] == 1


@pytest.mark.timeout(420)
@pytest.mark.parametrize("system", [s for s in STREAMING if s != "resumable-stream-resumed"])
def test_every_stream_is_read_whole(results: dict[str, Any], system: str) -> None:
    got = results["systems"][system]
    ran = scenarios_of(system)
    only_ours = {"f", "k"}  # cancels: tokenrelay's own API
    assert set(got) - {"b_sweep"} == set(ran) - only_ours | (
        only_ours if system == "tokenrelay" else set()
    )
    cpu = []
    for scenario in [got["a"], got["b"], *got["c"].values(), got["d"]]:
        assert scenario["errors"] == []
        assert scenario["tokens"] == scenario["expected_tokens"]
        assert scenario["latency_ms"]["count"] == scenario["tokens"]
        assert scenario["schedule_latency_ms"]["count"] == scenario["tokens"]
        assert scenario["incomplete_repetitions"] == 0
        cpu.append(scenario["cpu_us_per_token"]["total"])
    # CPU is counted for every scenario. A cheap one may read 0 (the kernel counts CPU time in
    # 10 ms ticks, and the raw ceiling streams the quick run's 2,000 tokens in less), not all.
    assert all(c >= 0 for c in cpu) and sum(cpu) > 0
    if "e" in ran:
        assert got["e"]["repeats"] == results["sizes"]["e"]["repeats"]
    if "g" in ran:
        assert got["g"]["open_at_measure"] == results["sizes"]["g"]["clients"]
    if system == "tokenrelay":
        # Every resume got its first token and every cancel kept its partial reply (the
        # scenario fails otherwise), while the whole load streamed.
        k, sizes = got["k"], results["sizes"]["k"]
        assert "failed" not in k
        assert k["load_runs"] == sizes["load_runs"]
        # At every level, from a client process of its own, every resume and every cancel.
        assert sorted(k["levels"], key=int) == [str(c) for c in sizes["concurrency"]]
        for level in k["levels"].values():
            assert level["resume"]["count"] == sizes["resumes"]
            assert level["cancel"]["count"] == sizes["cancels"]
        assert k["resume"] == k["levels"][str(sizes["concurrency"][0])]["resume"]


@pytest.mark.timeout(420)
@pytest.mark.parametrize("system", [s for s in STREAMING if "i" in scenarios_of(s)])
def test_the_join_storm_is_served_exactly(results: dict[str, Any], system: str) -> None:
    storm = results["systems"][system]["i"]
    readers = results["sizes"]["i"]["readers"]
    assert storm["readers"] == readers
    assert storm["duplicate_tokens"] == 0
    if system == "resumable-stream-resumed":
        # Its resume gives up after a fixed second under load: such a reader is an error,
        # reported, never a silent gap.
        assert storm["exact_readers"] + storm["error_count"] == readers
        return
    assert storm["errors"] == []
    assert storm["exact_readers"] == storm["caught_up_readers"] == readers
    assert storm["missing_tokens"] == 0
    assert storm["tokens"] == storm["expected_tokens"]


@pytest.mark.timeout(420)
@pytest.mark.parametrize("system", ["tokenrelay-dev", "langgraph-dev"])
def test_the_dev_commands_serve_every_demo_run(results: dict[str, Any], system: str) -> None:
    if system in results["skipped"]:
        pytest.skip(f"{system}: {results['skipped'][system]}")
    runs = results["systems"][system]["j"]
    assert set(runs) == {str(n) for n in results["sizes"]["j"]["runs"]}
    for n, got in runs.items():
        assert got["errors"] == []
        assert got["complete_clients"] == int(n)
        assert got["tokens"] == got["expected_tokens"]


@pytest.mark.timeout(420)
def test_resumed_readers_and_cancels_are_measured(results: dict[str, Any]) -> None:
    # resumable-stream gives up on a resume after a fixed second under load, so its errors are
    # reported, not asserted away; it must still have delivered.
    resumed = results["systems"]["resumable-stream-resumed"]
    assert resumed["b"]["tokens"] > 0 and resumed["c"]["100"]["tokens"] > 0
    cancel = results["systems"]["tokenrelay"]["f"]
    assert cancel["cancels"] == results["sizes"]["f"]["cancels"]


@pytest.mark.timeout(420)
def test_the_graph_alone_is_measured(results: dict[str, Any]) -> None:
    alone = results["astream"]
    assert alone["tokens"] == alone["expected_tokens"] > 0
    assert alone["cpu_us_per_token"]["total"] > 0


def test_docs_are_written_from_a_result(tmp_path: Path) -> None:
    from bench import report

    sample = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.json"
    if not sample.exists():
        pytest.fail("docs/benchmarks.json is missing: run `tokenrelay bench`")
    (tmp_path / "benchmarks.md").write_text("# Benchmarks\n\n## Other\n")
    report.write_docs(json.loads(sample.read_text()), tmp_path)
    text = (tmp_path / "benchmarks.md").read_text()
    assert report.BEGIN in text and report.END in text and "## Other" in text
    assert (tmp_path / "img" / "bench-latency-cdf.png").stat().st_size > 0
    # Rewriting replaces the section instead of adding a second one.
    report.write_docs(json.loads(sample.read_text()), tmp_path)
    assert (tmp_path / "benchmarks.md").read_text().count(report.BEGIN) == 1


def test_a_column_run_again_replaces_the_full_runs_and_the_report_says_so() -> None:
    from bench import report

    sample = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.json"
    full = json.loads(sample.read_text())
    full.pop("replaced", None)
    column = {"a": {"tokens": 1, "tokens_per_second": 12345.0}}
    rerun = {
        "machine": {**full["machine"], "date": "2026-01-02T03:04:05+00:00", "commit": "abc"},
        "systems": {"tokenrelay": column},
        "astream": {"cpu_us_per_token": {"total": 50.0}},
        "seconds": 99.0,
    }
    merged = report.replace_columns(full, rerun, "the first shared the machine")
    assert merged["systems"]["tokenrelay"] == column
    assert merged["systems"]["naive"] == full["systems"]["naive"]
    assert merged["astream"] == rerun["astream"]
    assert set(merged["replaced"]) == {"tokenrelay", "astream"}
    assert "tokenrelay" in full["systems"] and full["systems"]["tokenrelay"] != column
    text = report.section(merged)
    assert "The figures of `tokenrelay` and `astream` are from a second run" in text
    assert "commit `abc` (99 s)" in text and "the first shared the machine" in text
    assert "12,345" in text
    assert "second run" not in report.section(full)

    # A later run of other columns is named on its own, with its own date and commit.
    other = {**rerun, "machine": {**rerun["machine"], "date": "2026-02-03T04:05:06+00:00",
                                  "commit": "def"}, "systems": {"naive": column}}  # fmt: skip
    other.pop("astream")
    both = report.section(report.replace_columns(merged, other, "the naive column again"))
    assert "The figures of `tokenrelay` and `astream` are from a second run" in both
    assert "commit `abc` (99 s)" in both
    assert "The figures of `naive` are from a second run of those alone, on " in both
    assert "2026-02-03T04:05:06+00:00 at commit `def`" in both and "the naive column again" in both


@pytest.mark.timeout(300)
def test_the_workers_own_cost_is_measured() -> None:
    """`python -m bench.worker_cost` flushes and reports a cost per flush and per token (CPU
    seconds here, to stay quick; the instruction counts under callgrind take minutes)."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.worker_cost", "--cpu", "--runs", "3",
         "--flushes", "5", "25"],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["unit"] == "cpu_seconds" and out["runs_per_flush"] == 3
    assert out["publish"]["per_token"] == pytest.approx(out["publish"]["per_flush"] / 3)
