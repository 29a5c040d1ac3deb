"""The pure parts of the limits: JSON strictness and depth, the rate limiter, the connection cap."""

from __future__ import annotations

import resource

import pytest

from tokenrelay.api.limits import RateLimiter, json_problem
from tokenrelay.broker.settings import Settings


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b'{"a": [1, {"b": null}]}', None),
        (b"null", None),
        (b'"text"', None),
        (b"[[[[1]]]]", None),
        (b"[[[[[1]]]]]", "Request body nests JSON deeper than 4 levels"),
        (b'{"a":{"b":{"c":{"d":{}}}}}', "Request body nests JSON deeper than 4 levels"),
        (b'"\\ud800"', "Request body is not valid JSON: "),
        (b"NaN", "Request body is not valid JSON: "),
        (b'{"a": 1} x', "Request body is not valid JSON: "),
    ],
)
def test_json_problem(body: bytes, problem: str | None) -> None:
    got = json_problem(body, 4)
    assert got == problem if problem is None else got is not None and got.startswith(problem)


def test_rate_limiter_spends_a_burst_then_waits() -> None:
    limiter = RateLimiter(per_minute=60, burst=3)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert 0 < limiter.take("a") <= 1.0  # one token a second
    assert limiter.take("b") == 0.0  # a bucket per client


def test_connection_cap_defaults_to_the_descriptor_limit() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    expected = 65_536 if soft == resource.RLIM_INFINITY else max(64, soft - 128)
    assert Settings().connections_cap() == expected
    assert Settings(max_open_connections=10).connections_cap() == 10
