"""Structured log lines carry the run context."""

from __future__ import annotations

import json
import logging

from tokenrelay.broker.telemetry import JsonFormatter, TextFormatter


def record(**extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("tokenrelay.worker", logging.INFO, __file__, 1, "run %s", ("ok",), None)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_json_lines_carry_run_context() -> None:
    line = JsonFormatter().format(record(run_id="r1", thread_id="t1", worker_id="w1", attempt=2))
    out = json.loads(line)
    assert out["msg"] == "run ok"
    assert out["level"] == "info"
    assert (out["run_id"], out["thread_id"], out["worker_id"], out["attempt"]) == (
        "r1", "t1", "w1", 2,
    )  # fmt: skip


def test_text_lines_append_key_values() -> None:
    line = TextFormatter("%(message)s").format(record(run_id="r1", attempt=1))
    assert line == "run ok run_id=r1 attempt=1"
