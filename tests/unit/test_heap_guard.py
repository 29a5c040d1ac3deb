"""The worker's heap guard: no generational collections, the whole heap collected at a quiet moment
when it grew or is old (at once when it grew far), and the generational collector back for a
process that makes garbage cycles."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from tokenrelay.broker.runtime import HeapGuard


class Node:
    """An object in a reference cycle: only the cycle collector frees it."""

    def __init__(self) -> None:
        self.me = self


def cycle() -> weakref.ref[Node]:
    """A cycle nobody refers to: garbage until a collection examines it."""
    return weakref.ref(Node())


def acyclic(blocks: int) -> list[tuple[int, int]]:
    """Live objects in about `blocks` pymalloc blocks, in no cycle."""
    return [(i, i + 1) for i in range(blocks)]


class Watched(HeapGuard):
    """A guard that tells when it collected."""

    def __init__(self, **kwargs: float) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.collected = asyncio.Event()

    def collect(self) -> None:
        super().collect()
        self.collected.set()


@pytest.fixture(autouse=True)
def generational_afterwards() -> Iterator[None]:
    yield
    gc.enable()
    gc.unfreeze()
    gc.collect()


async def test_nothing_is_collected_by_itself_while_guarding() -> None:
    guard = HeapGuard(every=3600.0).start()
    try:
        assert not gc.isenabled()
        garbage = [cycle() for _ in range(30_000)]  # three times a young collection's due
        assert all(r() is not None for r in garbage)
        assert guard.check() is False  # well under the default growth
    finally:
        guard.close()
    assert gc.isenabled()


async def test_a_grown_heap_is_collected_and_the_guard_goes_on() -> None:
    guard = HeapGuard(growth=1.0, floor=50_000, every=3600.0).start()
    try:
        kept = acyclic(60_000)
        garbage = [cycle() for _ in range(100)]  # too few to count as a process making cycles
        assert guard.check() is True
        assert all(r() is None for r in garbage)
        assert guard.guarding and not gc.isenabled()
        assert guard.check() is False  # its limit moved past what is now live
        assert len(kept) == 60_000
    finally:
        guard.close()


async def test_a_busy_process_is_walked_only_once_its_heap_grew_far() -> None:
    busy = [True]
    guard = HeapGuard(
        growth=1.0, floor=50_000, hard_growth=1.0, hard_floor=400_000, every=3600.0,
        busy=lambda: busy[0],
    ).start()  # fmt: skip
    try:
        kept = acyclic(60_000)
        assert guard.check() is False  # past its limit, but busy
        busy[0] = False
        assert guard.check() is True  # quiet: collected
        busy[0] = True
        kept += acyclic(500_000)
        assert guard.check() is True  # past its hard limit: collected though busy
        assert guard.check() is False
        assert len(kept) == 560_000
    finally:
        guard.close()


async def test_a_process_making_cycles_gets_the_generational_collector_back() -> None:
    guard = HeapGuard(growth=1.0, floor=50_000, every=3600.0).start()
    garbage = [cycle() for _ in range(40_000)]
    assert guard.check() is True
    assert all(r() is None for r in garbage)
    assert not guard.guarding
    assert gc.isenabled()
    young = cycle()
    gc.collect(0)
    assert young() is None


async def test_an_old_heap_is_collected_though_it_did_not_grow() -> None:
    busy = [True]
    guard = HeapGuard(longest=0.0, every=3600.0, busy=lambda: busy[0]).start()
    try:
        garbage = cycle()
        assert guard.check() is False  # it waits for a quiet moment
        busy[0] = False
        assert guard.check() is True
        assert garbage() is None
        assert guard.guarding
    finally:
        guard.close()


async def test_the_guard_looks_at_the_heap_on_its_own() -> None:
    guard = Watched(growth=1.0, floor=50_000, every=0.01).start()
    try:
        guard.collected.clear()  # its start
        kept = acyclic(60_000)
        async with asyncio.timeout(10):
            await guard.collected.wait()
        assert guard.collections >= 1
        assert len(kept) == 60_000
    finally:
        guard.close()
