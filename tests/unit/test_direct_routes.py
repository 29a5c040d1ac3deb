"""Routes that bind their own arguments bind exactly what FastAPI would, or leave it to FastAPI."""

from __future__ import annotations

from contextlib import AsyncExitStack
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.dependencies.utils import solve_dependencies
from starlette.requests import Request

from tokenrelay.api.auth import SCOPE_KEY, Caller, Identity, caller
from tokenrelay.api.deps import services
from tokenrelay.api.direct import DirectRoute
from tokenrelay.api.routes import stream

ROUTES = [r for r in stream.router.routes if isinstance(r, DirectRoute)]

CASES: list[tuple[bytes, list[tuple[bytes, bytes]]]] = [
    (b"", []),
    (b"", [(b"last-event-id", b"1-0")]),
    (b"", [(b"Last-Event-ID", b"1-0"), (b"last-event-id", b"2-0")]),
    (b"last_event_id=3-0", []),
    (b"last_event_id=3-0&last_event_id=4-0", [(b"last-event-id", b"")]),
    (b"last_event_id=", []),
    (b"stream_mode=values&stream_mode=messages-tuple", []),
    (b"stream_mode=%5B%22values%22%5D&stream_mode=", []),
    (b"stream_mode=", []),
    (b"stream_token=abc&other=1", []),
    (b"max_seconds=30", []),
    (b"max_seconds=0.25&max_seconds=7", []),
    (b"max_seconds=007.50", []),
    (b"max_seconds=0", []),
    (b"max_seconds=0.0", []),
    (b"max_seconds=-1", []),
    (b"max_seconds=1e3", []),
    (b"max_seconds=inf", []),
    (b"max_seconds=nan", []),
    (b"max_seconds=%201", []),
    (b"max_seconds=", []),
    (b"max_seconds=abc", []),
    (b"max_seconds=5.", []),
]


APP = SimpleNamespace(state=SimpleNamespace(services=object(), auth=None), dependency_overrides={})
"""What the binders and FastAPI's dependencies read of the app."""


def _request(route: DirectRoute, query: bytes, headers: list[tuple[bytes, bytes]]) -> Request:
    path_params = {name: f"{name}-1" for name in route.param_convertors}
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": route.path_format.format(**path_params),
        "query_string": query,
        "headers": [(k.lower(), v) for k, v in headers],
        "path_params": path_params,
        "app": APP,
        SCOPE_KEY: Identity(user={"identity": "u"}),
    }
    return Request(scope)


def _comparable(args: dict[str, Any]) -> dict[str, Any]:
    who = args.pop("who")
    assert isinstance(who, Caller)
    return {**args, "who": (who.svc, who.identity)}


@pytest.mark.parametrize("route", ROUTES, ids=[r.name for r in ROUTES])
@pytest.mark.parametrize(("query", "headers"), CASES)
async def test_binds_as_fastapi_or_declines(
    route: DirectRoute, query: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    bound = route.bind(_request(route, query, headers))
    request = _request(route, query, headers)
    async with AsyncExitStack() as stack:
        request.scope["fastapi_inner_astack"] = request.scope["fastapi_function_astack"] = stack
        solved = await solve_dependencies(
            request=request,
            dependant=route.dependant,
            async_exit_stack=stack,
            embed_body_fields=False,
        )
    if bound is None:  # declined: only a value FastAPI validates (and may refuse)
        assert b"max_seconds=" in query
        return
    assert not solved.errors
    assert _comparable(bound) == _comparable(dict(solved.values))


@pytest.mark.parametrize("route", ROUTES, ids=[r.name for r in ROUTES])
def test_plain_joins_take_the_direct_path(route: DirectRoute) -> None:
    for query in (b"", b"last_event_id=1-0&stream_mode=values", b"max_seconds=25"):
        assert route.bind(_request(route, query, [(b"last-event-id", b"1-0")])) is not None


def test_both_joins_bind_their_own_arguments() -> None:
    assert sorted(r.path for r in ROUTES) == [
        "/threads/{thread_id}/runs/{run_id}/stream",
        "/threads/{thread_id}/stream",
    ]
    for route in ROUTES:  # what the binders supply, and nothing they would skip
        assert [d.call for d in route.dependant.dependencies] == [services, caller]
        assert not route.dependencies and not stream.router.dependencies
