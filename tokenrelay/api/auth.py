"""Who is calling, and which threads they may touch.

`AuthLayer` is a plain ASGI middleware (streaming responses pass through it untouched). Per
request it settles an `Identity`, in this order: a ``?stream_token=`` on a stream or resume
endpoint (see ``tokenrelay/api/tokens.py``); else the project's ``langgraph_sdk.Auth`` object, whose
``@auth.authenticate`` runs unchanged; else ``TOKENRELAY_API_KEYS`` (``x-api-key``, compared in
constant time); else nobody (dev). Probes, metrics and the docs stay open.

Routes then ask a `Caller` (a dependency) before touching a thread: it runs the Auth object's
``@auth.on`` handlers as the Agent Server does (the most specific of resource+action, resource,
action, global), refuses on ``False`` (403), and applies a returned filter to the thread's
metadata, so another user's thread is answered exactly as a missing one (404).
"""

from __future__ import annotations

import hmac
import inspect
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import orjson
from fastapi import HTTPException
from langgraph_sdk import Auth
from starlette.datastructures import Headers
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenrelay.api.deps import Services
from tokenrelay.api.tokens import StreamGrant, StreamTokenError, StreamTokens
from tokenrelay.broker.errors import GraphLoadError, ThreadNotFound
from tokenrelay.broker.graphs import import_object
from tokenrelay.broker.log import last_of
from tokenrelay.broker.models import Entry, StreamId
from tokenrelay.broker.runs import RunRecord
from tokenrelay.broker.settings import Settings
from tokenrelay.broker.threads import ThreadRecord, ThreadStore

SCOPE_KEY = "tokenrelay.identity"
Filter = dict[str, Any]

# The endpoints a stream token opens: (method, path pattern). A run-bound token opens only
# the patterns that name its run.
_STREAM_PATHS = [
    ("GET", re.compile(r"^/threads/(?P<thread>[^/]+)/runs/(?P<run>[^/]+)/(stream|join|events)$")),
    ("GET", re.compile(r"^/threads/(?P<thread>[^/]+)/stream$")),
    ("GET", re.compile(r"^/ai/chat/(?P<thread>[^/]+)/stream$")),
    ("POST", re.compile(r"^/threads/(?P<thread>[^/]+)/stream/events$")),
]


class User:
    """The authenticated user as the Auth handlers see it (``ctx.user``): what
    ``@auth.authenticate`` returned, as a string, a dict or a user object."""

    __slots__ = ("_fields", "display_name", "identity", "is_authenticated", "permissions")

    def __init__(self, fields: Mapping[str, Any]) -> None:
        self._fields = dict(fields)
        self.identity = str(fields["identity"])
        self.display_name = str(fields.get("display_name") or self.identity)
        self.is_authenticated = bool(fields.get("is_authenticated", True))
        self.permissions: list[str] = list(fields.get("permissions") or [])

    def __getitem__(self, key: str) -> Any:
        return self._fields[key]

    def __contains__(self, key: object) -> bool:
        return key in self._fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def keys(self) -> Iterable[str]:
        return self._fields.keys()


def _user(result: Any) -> Any:
    if isinstance(result, str):
        return User({"identity": result})
    if isinstance(result, Mapping):
        if "identity" not in result:
            raise ValueError("the authenticate handler returned a dict without 'identity'")
        return User(result)
    if getattr(result, "identity", None) is None:
        raise ValueError("the authenticate handler returned no user identity")
    return result


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a request is: a custom-auth user, a stream token's grant, or neither (an API key or
    an open deployment)."""

    user: Any = None
    grant: StreamGrant | None = None


ANONYMOUS = Identity()


def load_auth(settings: Settings) -> Auth | None:
    """The project's Auth object (``TOKENRELAY_AUTH``), or None when none is configured."""
    if not settings.auth:
        return None
    auth = import_object(settings.auth, "auth path")
    if not isinstance(auth, Auth):
        raise GraphLoadError(
            f"auth {settings.auth!r} is a {type(auth).__name__}, not a langgraph_sdk.Auth"
        )
    return auth


def can_deny(scope: Scope) -> bool:
    """Whether the server can answer a WebSocket handshake with an HTTP response."""
    return "websocket.http.response" in scope.get("extensions", {})


def _refusal(status: int, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=dict(headers or {}))


class AuthLayer:
    """Settle the request's `Identity` (in ``scope[SCOPE_KEY]``) or refuse it (401/403)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        auth: Auth | None,
        api_keys: Iterable[str],
        tokens: StreamTokens,
        open_paths: Iterable[str],
        paths: Callable[[], Mapping[str, Mapping[str, Any]]],
        guard_other_paths: bool = True,
    ) -> None:
        self.app = app
        self._auth = auth
        self._keys = [k.encode() for k in api_keys]
        self._tokens = tokens
        self._open = frozenset(open_paths)
        self._paths = paths
        self._patterns: list[tuple[re.Pattern[str], frozenset[str]]] | None = None
        self._guard_other_paths = guard_other_paths
        authenticate = auth._authenticate_handler if auth is not None else None
        self._authenticate = authenticate
        self._wants = set(inspect.signature(authenticate).parameters) if authenticate else set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        scope[SCOPE_KEY] = ANONYMOUS
        if (
            scope["path"] in self._open
            or scope.get("method") == "OPTIONS"
            or not (self._guard_other_paths or self._route(scope, any_method=True) is not None)
        ):
            await self.app(scope, receive, send)
            return
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        token = query.get("stream_token")
        refusal: JSONResponse | None = None
        if token is not None:
            refusal = self._check_token(scope, token)
        elif self._authenticate is not None:
            refusal, receive = await self._run_authenticate(scope, receive, query)
        elif self._keys and not self._key_ok(Headers(scope=scope).get("x-api-key")):
            refusal = _refusal(401, "Missing or invalid API key (x-api-key header)")
        if refusal is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket" and not can_deny(scope):
            await send({"type": "websocket.close", "code": 4000 + refusal.status_code})
        else:  # an HTTP answer, to a WebSocket handshake too (its denial response)
            await refusal(scope, receive, send)

    def _key_ok(self, given: str | None) -> bool:
        if given is None:
            return False
        ok = False
        for key in self._keys:  # every key compared, each in constant time
            ok |= hmac.compare_digest(given.encode(), key)
        return ok

    def _check_token(self, scope: Scope, token: str) -> JSONResponse | None:
        try:
            grant = self._tokens.verify(token)
        except StreamTokenError as exc:
            return _refusal(401, str(exc))
        if scope["type"] == "http":
            for method, pattern in _STREAM_PATHS:
                found = pattern.match(scope["path"])
                if found and scope["method"] == method:
                    run_id = found.groupdict().get("run")
                    if grant.covers(found["thread"], run_id):
                        scope[SCOPE_KEY] = Identity(grant=grant)
                        return None
                    break
        return _refusal(403, "the stream token does not grant this stream")

    def _route(self, scope: Scope, *, any_method: bool = False) -> dict[str, Any] | None:
        """The path parameters of the API route the request will reach (matched here, before
        routing, against the API's path templates), or None for a path of no API route."""
        if self._patterns is None:
            self._patterns = [
                (compile_path(path)[0], frozenset(m.upper() for m in methods))
                for path, methods in self._paths().items()
            ]
        method = scope.get("method")
        for pattern, methods in self._patterns:
            found = pattern.match(scope["path"])
            if found and (any_method or method is None or method in methods):
                return found.groupdict()
        return None

    async def _run_authenticate(
        self, scope: Scope, receive: Receive, query: dict[str, str]
    ) -> tuple[JSONResponse | None, Receive]:
        assert self._authenticate is not None
        headers = Headers(scope=scope)
        body = b""
        replay: Callable[[], Receive] = lambda: receive  # noqa: E731
        if scope["type"] == "http" and self._wants & {"body", "request"}:
            body, replay = await _read_body(receive)
            receive = replay()
        available: dict[str, Callable[[], Any]] = {
            "request": lambda: Request(scope, replay()) if scope["type"] == "http" else None,
            "path": lambda: scope["path"],
            "method": lambda: scope.get("method", "GET"),
            "path_params": lambda: self._route(scope) or {},
            "query_params": lambda: query,
            "headers": lambda: dict(scope["headers"]),
            "authorization": lambda: headers.get("authorization"),
        }
        kwargs = {name: make() for name, make in available.items() if name in self._wants}
        try:
            if "body" in self._wants:
                kwargs["body"] = _json_or_none(body)
            user = _user(await self._authenticate(**kwargs))
        except Auth.exceptions.HTTPException as exc:
            return _refusal(exc.status_code, exc.detail, exc.headers), receive
        except PermissionError as exc:
            return _refusal(403, str(exc) or "Forbidden"), receive
        except Exception as exc:
            return _refusal(401, str(exc) or "Unauthorized"), receive
        scope[SCOPE_KEY] = Identity(user=user)
        scope["user"] = user  # `request.user`, for http.app's routes as on the Agent Server
        return None, receive


async def _read_body(receive: Receive) -> tuple[bytes, Callable[[], Receive]]:
    """Read the whole request body now; and a maker of `receive` callables that each replay it
    from the start, so the handler and the route both see all of it."""
    messages: list[Message] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body"):
            break
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")

    def replay() -> Receive:
        pending = list(messages)

        async def next_message() -> Message:
            return pending.pop(0) if pending else await receive()

        return next_message

    return body, replay


def _json_or_none(body: bytes) -> Any:
    """The body as JSON for the handler's `body`; a body that is not JSON is the route's to
    refuse (422), not a reason to fail authentication."""
    try:
        return orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None


# -- authorization ----------------------------------------------------------------------------


def matches(metadata: Mapping[str, Any], flt: Filter) -> bool:
    """Whether `metadata` passes a handler's filter: ``{key: value}`` or ``{key: {"$eq": v}}``
    for equality, ``{key: {"$contains": v or [v...]}}`` for list membership; keys AND-ed."""
    for key, want in flt.items():
        have = metadata.get(key)
        if isinstance(want, dict) and want and set(want) <= {"$eq", "$contains"}:
            if "$eq" in want and have != want["$eq"]:
                return False
            if "$contains" in want:
                need = want["$contains"]
                need = need if isinstance(need, list) else [need]
                if not isinstance(have, list) or any(n not in have for n in need):
                    return False
        elif have != want:
            return False
    return True


class Caller:
    """The request's identity, asked by routes before they touch a thread or an assistant."""

    def __init__(self, svc: Services, identity: Identity, auth: Auth | None) -> None:
        self.svc = svc
        self.identity = identity
        self._auth = auth if identity.user is not None else None

    def run_configurable(self) -> dict[str, Any]:
        """What a run's graph gets in ``config["configurable"]`` about its user, under the Agent
        Server's keys (the worker trusts what the API stored); empty without custom auth."""
        user = self.identity.user
        if user is None:
            return {}
        fields = dict(user) if isinstance(user, User) else {}
        permissions = list(getattr(user, "permissions", []) or [])
        fields.update(identity=str(user.identity), permissions=permissions)
        fields.setdefault("display_name", getattr(user, "display_name", user.identity))
        return {
            "langgraph_auth_user": fields,
            "langgraph_auth_user_id": str(user.identity),
            "langgraph_auth_permissions": permissions,
        }

    def _handler(self, resource: str, action: str) -> Callable[..., Awaitable[Any]] | None:
        assert self._auth is not None
        for key in ((resource, action), (resource, "*"), ("*", action)):
            found = self._auth._handlers.get(key)
            if found:
                return found[-1]
        return self._auth._global_handlers[-1] if self._auth._global_handlers else None

    async def allow(self, resource: str, action: str, value: dict[str, Any]) -> Filter | None:
        """Run the handler for `resource`.`action` on `value` (which it may change, e.g. its
        metadata); its filter, or None for everything. False is a 403."""
        grant = self.identity.grant
        if grant is not None:
            if (resource, action) == ("threads", "read") and grant.covers(
                str(value.get("thread_id")), value.get("run_id") or grant.run_id
            ):
                return None
            raise HTTPException(403, "the stream token does not grant this")
        if self._auth is None:
            return None
        handler = self._handler(resource, action)
        if handler is None:
            return None
        ctx = Auth.types.AuthContext(
            permissions=list(getattr(self.identity.user, "permissions", []) or []),
            user=self.identity.user,
            resource=resource,  # type: ignore[arg-type]
            action=action,  # type: ignore[arg-type]
        )
        try:
            result = await handler(ctx=ctx, value=value)
        except Auth.exceptions.HTTPException as exc:
            raise HTTPException(exc.status_code, exc.detail, dict(exc.headers or {})) from None
        if result is False:
            raise HTTPException(403, "Forbidden")
        if result is None or result is True:
            return None
        if isinstance(result, dict):
            return result
        raise HTTPException(500, f"auth handler for {resource}.{action} returned {result!r}")

    async def thread(self, thread_id: str, op: str = "read", **value: Any) -> ThreadRecord:
        """The thread, if the caller may do `op` (an auth action) on it, with `value` for the
        handler; someone else's thread is not found."""
        flt = await self.allow("threads", op, {"thread_id": thread_id, **value})
        try:
            thread = await self.svc.threads.get(thread_id)
        except ThreadNotFound:
            run_id = value.get("run_id")
            if isinstance(run_id, str):
                # A run lost with its Redis (or expired) says so (410), not just "not found".
                await self.svc.runs.find(thread_id, run_id)
            raise
        if flt and not matches(thread.metadata, flt):
            raise ThreadNotFound(thread_id)
        return thread

    async def run(
        self, thread_id: str, run_id: str, op: str = "read", **value: Any
    ) -> tuple[RunRecord, Entry | None]:
        """The run `run_id` of a thread the caller may do `op` on (with `value` for the
        handler, as `thread`), and the newest entry of its stream: what a cancel needs, read
        in one round trip (the hot path of a stop on a busy API)."""
        run, last, _ = await self.join(thread_id, run_id, None, op, **value)
        return run, last

    async def join(
        self, thread_id: str, run_id: str, after: StreamId | None, op: str = "read", **value: Any
    ) -> tuple[RunRecord, Entry | None, list[bytes] | None]:
        """`run`, and with `after` the page of its stream after `after` (`EventLog.page_of`:
        None if it must be read again): a join's lookup and first read in one round trip (the
        hot path of a storm of reconnecting clients)."""
        svc = self.svc
        flt = await self.allow("threads", op, {"thread_id": thread_id, "run_id": run_id, **value})
        pipe = svc.redis.pipeline(transaction=False)
        svc.threads.get_in(pipe, thread_id)
        svc.runs.get_in(pipe, run_id)
        svc.log.last_entry_in(pipe, run_id)
        if after is not None:
            svc.log.page_in(pipe, run_id, after)
        thread_h, run_h, last, *page = await pipe.execute()
        try:
            thread = ThreadStore.record(thread_id, thread_h)
        except ThreadNotFound:
            # A run lost with its Redis (or expired) says so (410), not just "not found".
            await svc.runs.find(thread_id, run_id)
            raise
        if flt and not matches(thread.metadata, flt):
            raise ThreadNotFound(thread_id)
        first = svc.log.page_of(*page) if page else None
        return await svc.runs.found(thread_id, run_id, run_h), last_of(last), first

    async def visible(self, thread_id: str, op: str = "read", **value: Any) -> bool:
        """False when the thread does not exist; ThreadNotFound when it is someone else's."""
        if not await self.svc.threads.exists(thread_id):
            return False
        await self.thread(thread_id, op, **value)
        return True

    async def new_thread_metadata(
        self, thread_id: str | None, metadata: dict[str, Any], if_exists: str = "raise"
    ) -> dict[str, Any]:
        """The metadata a new thread is stored with, as the create handler leaves it."""
        value: dict[str, Any] = {
            "thread_id": thread_id, "metadata": dict(metadata), "if_exists": if_exists
        }  # fmt: skip
        await self.allow("threads", "create", value)
        return dict(value.get("metadata") or {})


def caller_of(conn: HTTPConnection) -> Caller:
    """The `Caller` of this request or WebSocket, as `AuthLayer` settled its identity."""
    svc: Services = conn.app.state.services
    identity = conn.scope.get(SCOPE_KEY, ANONYMOUS)
    return Caller(svc, identity, getattr(conn.app.state, "auth", None))


async def caller(conn: HTTPConnection) -> Caller:
    """The dependency: the `Caller` of this request or WebSocket (async: no thread hop)."""
    return caller_of(conn)
