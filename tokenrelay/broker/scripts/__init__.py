"""Lua scripts, one per ``.lua`` file, registered once and called by name with EVALSHA."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any

from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.exceptions import NoScriptError

from tokenrelay.broker.connection import RedisClient, in_order

AnyPipeline = Pipeline | ClusterPipeline


@dataclass(frozen=True, slots=True)
class LuaScript:
    name: str
    source: str
    sha: str

    async def __call__(self, redis: RedisClient, keys: list[str], args: list[Any]) -> Any:
        """Run the script, loading it first if the server does not know it (e.g. restarted)."""
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)  # type: ignore[misc]
        except NoScriptError:
            await redis.script_load(self.source)
            return await redis.evalsha(self.sha, len(keys), *keys, *args)  # type: ignore[misc]

    def queue(self, pipe: AnyPipeline, keys: Sequence[str | bytes], args: list[Any]) -> None:
        """Queue an EVALSHA on `pipe`; the caller handles NoScriptError in the results."""
        # Not `pipe.evalsha`: redis-py refuses that helper on cluster pipelines, since a script's
        # keys are unknown in general. Ours are always declared and share one slot, and the
        # cluster pipeline routes EVALSHA by its declared keys.
        pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)

    async def load(self, redis: RedisClient) -> None:
        await redis.script_load(self.source)


class RoundTrip:
    """Commands sent in one round trip (a pipeline, no transaction), script calls among them.
    Redis applies one connection's commands in order, and a cluster one node's: commands on
    one hash slot land in the order they were queued. A script Redis no longer knows
    (restarted, failed over) is loaded and its calls are sent again, in their order."""

    def __init__(self, redis: RedisClient) -> None:
        self._redis = redis
        self.pipe: AnyPipeline = redis.pipeline(transaction=False)
        self._calls: dict[int, tuple[LuaScript, list[str], list[Any]]] = {}

    def script(self, script: LuaScript, keys: list[str], args: list[Any]) -> int:
        """Queue a call of `script`; returns where its reply will be."""
        index = len(self.pipe)
        self._calls[index] = (script, keys, args)
        script.queue(self.pipe, keys, args)
        return index

    async def execute(self, *, raise_on_error: bool = True) -> list[Any]:
        """Every reply, in order; with `raise_on_error` off, an error in its command's place."""
        replies: list[Any] = await self.pipe.execute(raise_on_error=False)
        lost = [i for i in self._calls if isinstance(replies[i], NoScriptError)]
        if lost:
            for name in dict.fromkeys(self._calls[i][0].name for i in lost):
                await script(name).load(self._redis)
            again = self._redis.pipeline(transaction=False)
            for i in lost:
                lua, keys, args = self._calls[i]
                lua.queue(again, keys, args)
            for i, reply in zip(lost, await again.execute(raise_on_error=False), strict=True):
                replies[i] = reply
        if raise_on_error:
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return replies


async def in_sequence(
    redis: RedisClient,
    first: Callable[[AnyPipeline], object],
    then: Callable[[AnyPipeline], object],
) -> tuple[list[Any], list[Any]]:
    """Send the commands `first` queues, then those `then` queues, which must take effect after
    them (a hash before the list that names it): in one round trip where one server applies a
    pipeline in order (`in_order`), else `then`'s in a round trip of their own once `first`'s
    are answered. Returns the replies of each."""
    pipe = redis.pipeline(transaction=False)
    first(pipe)
    split = len(pipe)
    if in_order(redis):
        then(pipe)
        replies: list[Any] = await pipe.execute()
        return replies[:split], replies[split:]
    before: list[Any] = await pipe.execute()
    after = redis.pipeline(transaction=False)
    then(after)
    return before, await after.execute()


@cache
def script(name: str) -> LuaScript:
    """The script in ``scripts/<name>.lua``."""
    source = files(__package__).joinpath(f"{name}.lua").read_text()
    return LuaScript(name, source, hashlib.sha1(source.encode()).hexdigest())
