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


def test_a_loop_counter_is_scraped_as_a_counter() -> None:
    from prometheus_client import REGISTRY, generate_latest

    from tokenrelay.broker.telemetry import EVENTS_SENT

    before = REGISTRY.get_sample_value("tokenrelay_api_events_sent_total")
    EVENTS_SENT.inc(3)
    EVENTS_SENT.inc()
    assert REGISTRY.get_sample_value("tokenrelay_api_events_sent_total") == (before or 0) + 4
    text = generate_latest().decode()
    assert "# TYPE tokenrelay_api_events_sent_total counter" in text
    assert f"tokenrelay_api_events_sent_total {float((before or 0) + 4)}" in text
