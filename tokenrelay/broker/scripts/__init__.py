"""Lua scripts, one per ``.lua`` file, registered once and called by name with EVALSHA."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any

from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.exceptions import NoScriptError

from tokenrelay.broker.connection import RedisClient

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

    def queue(self, pipe: AnyPipeline, keys: list[str], args: list[Any]) -> None:
        """Queue an EVALSHA on `pipe`; the caller handles NoScriptError in the results."""
        # Not `pipe.evalsha`: redis-py refuses that helper on cluster pipelines, since a script's
        # keys are unknown in general. Ours are always declared and share one slot, and the
        # cluster pipeline routes EVALSHA by its declared keys.
        pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)

    async def load(self, redis: RedisClient) -> None:
        await redis.script_load(self.source)


@cache
def script(name: str) -> LuaScript:
    """The script in ``scripts/<name>.lua``."""
    source = files(__package__).joinpath(f"{name}.lua").read_text()
    return LuaScript(name, source, hashlib.sha1(source.encode()).hexdigest())
