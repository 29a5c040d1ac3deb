"""Routes that bind their own arguments, skipping FastAPI's per-request parameter solving.

FastAPI resolves the dependencies and converts and validates every parameter of every request:
on a join, the hot path of a reconnect storm, that is about a sixth of the API's CPU. A
`DirectRoute` keeps its declared endpoint (the OpenAPI operation, and the reference for what
each parameter means) and calls it with arguments its binder reads from the request. A binder
declines (None) any request it would not bind exactly as FastAPI does, such as a value that
needs validating, and that request takes FastAPI's path: bad input gets the same 422.
A router holding such routes is included without dependencies of its own (they would be
skipped).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ClassVar

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

Binder = Callable[[Request], dict[str, Any] | None]
"""The endpoint's keyword arguments for a request, or None to let FastAPI bind them."""


class DirectRoute(APIRoute):
    """An `APIRoute` whose requests its `bind` binds; those it declines FastAPI solves."""

    bind: ClassVar[Binder]

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        solved = super().get_route_handler()
        if self.dependencies:
            return solved  # dependencies of the route itself, not its endpoint: FastAPI's
        endpoint: Callable[..., Awaitable[Response]] = self.endpoint
        bind = type(self).bind

        async def handle(request: Request) -> Response:
            # Overridden dependencies (tests of an embedding app) are FastAPI's to apply.
            args = None if getattr(request.app, "dependency_overrides", None) else bind(request)
            if args is None:
                return await solved(request)
            return await endpoint(**args)

        return handle


def direct_route(bind: Binder) -> type[APIRoute]:
    """The route class (for ``route_class_override``) of an endpoint bound by `bind`."""
    return type("DirectRoute", (DirectRoute,), {"bind": staticmethod(bind)})
