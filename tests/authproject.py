"""A `langgraph_sdk.Auth` object for tests/integration/test_auth.py: what `authenticate` was
given is kept, so the test can check it got what the Agent Server passes."""

from __future__ import annotations

from typing import Any

from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph_sdk import Auth
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

auth = Auth()
webapp = Starlette(routes=[Route("/hello", lambda request: PlainTextResponse("hello"))])
SEEN: list[dict[str, Any]] = []


def _whoami(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
    conf = config["configurable"]
    user = conf["langgraph_auth_user"]
    said = f"{conf['langgraph_auth_user_id']} {user['display_name']} {user['permissions']}"
    return {"messages": [AIMessage(content=said)]}


# Answers with what the worker was told about the run's user.
whoami = (
    StateGraph(MessagesState).add_node("whoami", _whoami)
    .add_edge(START, "whoami").add_edge("whoami", END).compile()
)  # fmt: skip


@auth.authenticate
async def authenticate(
    authorization: str | None,
    path: str,
    method: str,
    path_params: dict[str, str],
    query_params: dict[str, str],
    headers: dict[bytes, bytes],
    body: Any,
) -> Auth.types.MinimalUserDict:
    SEEN.append({"path": path, "method": method, "path_params": path_params,
                 "query_params": query_params, "headers": headers, "body": body})  # fmt: skip
    token = (authorization or "").removeprefix("Bearer ")
    if token == "suspended":
        raise Auth.exceptions.HTTPException(status_code=403, detail="account suspended")
    if token == "broken":
        raise ValueError("token signature does not verify")
    if not token:
        raise Auth.exceptions.HTTPException(detail="no token")
    return {"identity": token, "permissions": ["team:red"] if token == "carol" else []}


@auth.on
async def owner(ctx: Auth.types.AuthContext, value: dict[str, Any]) -> Auth.types.FilterType:
    value.setdefault("metadata", {})["owner"] = ctx.user.identity
    return {"owner": ctx.user.identity}


@auth.on.threads.create
async def create(ctx: Auth.types.AuthContext, value: dict[str, Any]) -> None:
    metadata = value.setdefault("metadata", {})
    metadata["owner"] = ctx.user.identity
    metadata["members"] = [ctx.user.identity, *metadata.get("invite", [])]


@auth.on.threads.read
async def members(ctx: Auth.types.AuthContext, value: dict[str, Any]) -> Auth.types.FilterType:
    # The most specific handler wins over the global one: members read, not only the owner.
    return {"members": {"$contains": ctx.user.identity}}


@auth.on.threads.update
async def red_team_only(ctx: Auth.types.AuthContext, value: dict[str, Any]) -> bool:
    return "team:red" in ctx.permissions
