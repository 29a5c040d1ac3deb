"""Lua scripts, one per ``.lua`` file, registered once and called by name with EVALSHA."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError


@dataclass(frozen=True, slots=True)
class LuaScript:
    name: str
    source: str
    sha: str

    async def __call__(self, redis: Redis, keys: list[str], args: list[Any]) -> Any:
        """Run the script, loading it first if the server does not know it (e.g. restarted)."""
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)  # type: ignore[misc]
        except NoScriptError:
            await redis.script_load(self.source)
            return await redis.evalsha(self.sha, len(keys), *keys, *args)  # type: ignore[misc]

    def queue(self, pipe: Pipeline, keys: list[str], args: list[Any]) -> None:
        """Queue an EVALSHA on `pipe`; the caller handles NoScriptError in the results."""
        pipe.evalsha(self.sha, len(keys), *keys, *args)

    async def load(self, redis: Redis) -> None:
        await redis.script_load(self.source)


@cache
def script(name: str) -> LuaScript:
    """The script in ``scripts/<name>.lua``."""
    source = files(__package__).joinpath(f"{name}.lua").read_text()
    return LuaScript(name, source, hashlib.sha1(source.encode()).hexdigest())
