"""server/slot_gate.py: at most `slots` adapters in the engine; freed slots to the adapter with
the most waiting requests; no request waits past its deadline for long (pure asyncio, fast)."""

from __future__ import annotations

import asyncio

import pytest

from loraplex.server.slot_gate import SlotGate


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


async def _enter_all(gate: SlotGate, ids: list[int]) -> list[asyncio.Task]:
    tasks = [asyncio.create_task(gate.enter(i)) for i in ids]
    await asyncio.sleep(0)
    return tasks


def test_resident_adapters_go_in_and_a_freed_slot_goes_to_the_most_wanted():
    async def main():
        gate = SlotGate(2, deadline_s=10, clock=Clock())
        first = await _enter_all(gate, [1, 2, 1])
        assert all(t.done() for t in first) and gate.active == {1: 2, 2: 1}
        queued = await _enter_all(gate, [3, 4, 4])
        assert not any(t.done() for t in queued)
        gate.leave(2)  # adapter 2's slot frees: adapter 4 (two waiting) beats 3 (one, older)
        await asyncio.sleep(0)
        assert [t.done() for t in queued] == [False, True, True] and gate.active == {1: 2, 4: 2}
        assert len(gate.active) <= 2
    asyncio.run(main())


def test_an_overdue_request_drains_the_smallest_slot_holder():
    async def main():
        clock = Clock()
        gate = SlotGate(2, deadline_s=1.0, clock=clock)
        await _enter_all(gate, [1, 1, 1, 2])
        (rare,) = await _enter_all(gate, [3])
        clock.t = 1.5
        gate.tick()
        assert gate.draining == {2}  # adapter 2 has one request in the engine, 1 has three
        (late,) = await _enter_all(gate, [2])
        assert not late.done()  # draining: no new request for it
        more = await _enter_all(gate, [1])
        assert all(t.done() for t in more)  # adapter 1 is not draining
        gate.leave(2)  # its last request ends: the overdue adapter 3 is next, before 2 again
        await asyncio.sleep(0)
        assert rare.done() and not late.done() and set(gate.active) == {1, 3}
        late.cancel()
    asyncio.run(main())


def test_each_overdue_adapter_drains_a_slot_holder_of_its_own():
    async def main():
        clock = Clock()
        gate = SlotGate(3, deadline_s=1.0, clock=clock)
        await _enter_all(gate, [1, 1, 1, 2, 2, 3])
        rare = await _enter_all(gate, [4, 5])
        clock.t = 1.5
        gate.tick()
        assert gate.draining == {3, 2}  # two overdue adapters: the two smallest holders
        gate.tick()
        assert gate.draining == {3, 2}  # no more than needed
        gate.leave(3)
        gate.leave(2)
        gate.leave(2)
        await asyncio.sleep(0)
        assert all(t.done() for t in rare) and set(gate.active) == {1, 4, 5}
        assert not gate.draining
    asyncio.run(main())


def test_a_cancelled_waiter_is_forgotten_and_a_granted_one_gives_its_slot_back():
    async def main():
        gate = SlotGate(1, clock=Clock())
        await _enter_all(gate, [1])
        (w,) = await _enter_all(gate, [2])
        w.cancel()
        with pytest.raises(asyncio.CancelledError):
            await w
        assert gate.waiting == {}
        gate.leave(1)
        assert gate.active == {}
    asyncio.run(main())
