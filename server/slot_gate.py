"""LoRA-aware admission in front of the engine: requests for at most `max_loras` adapters at once.

vLLM's scheduler batches at most `max_loras` distinct adapters per step. A waiting request whose
adapter would be one more is skipped, and first come, first served decides which adapter gets a
slot that frees. Under skewed traffic most of the requests in flight may be waiting for a slot
(docs/benchmarks.md, issue 15: Zipf TTFT p50 2.7 s against 0.55 s for one adapter).

The gate holds those requests here instead and decides who gets a freed slot:
- a request whose adapter has a slot goes in at once, as in vLLM;
- when a slot frees, the adapter with the most waiting requests gets it, and all of them go in
  together, so each step batches as many requests as the slots allow;
- no starvation: once a request has waited `deadline_s`, its adapter is next, oldest first. If
  no slot frees by itself, for each overdue adapter one slot holder (the fewest requests in the
  engine first) takes no new requests until its last one ends ("draining"), so the slots free
  within one request's lifetime.

The engine then never sees more adapters than it has slots, and its own skip rule never acts.
Requests for the base model do not pass through the gate.

Off by default (`lora_slot_gate`): measured with `many_adapters.py --variant
gate=LORAPLEX_LORA_SLOT_GATE=true` (deadlines 0.5, 1 and 2 s), it gave 0.93-0.95x the Zipf
throughput of vLLM's own rule and no better TTFT tail (docs/benchmarks.md, 2026-12-02). The
request path (`serving.py` `run`) enters after `manager.acquire` and leaves on release. Pinned
adapters are pinned in vLLM's host memory only, never in a batch slot (`VllmEngine.pin_lora`), so
the gate's count of slots is the engine's.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class _Waiter:
    since: float
    fut: asyncio.Future = field(repr=False)


class SlotGate:
    def __init__(self, slots: int, deadline_s: float = 2.0, clock=time.monotonic):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, not {slots}")
        self.slots = slots
        self.deadline_s = deadline_s
        self.clock = clock
        self.active: dict[int, int] = {}  # adapter int id -> its requests in the engine
        self.waiting: dict[int, deque[_Waiter]] = {}  # adapter int id -> its queued requests
        self.draining: set[int] = set()  # slot holders taking no new requests

    # -- the request's side --------------------------------------------------------------
    async def enter(self, int_id: int) -> None:
        """Return once the request may go to the engine (then `leave` exactly once)."""
        if self._may_enter(int_id):
            self.active[int_id] = self.active.get(int_id, 0) + 1
            return
        w = _Waiter(self.clock(), asyncio.get_running_loop().create_future())
        self.waiting.setdefault(int_id, deque()).append(w)
        self._drain_if_overdue()
        try:
            await w.fut
        except asyncio.CancelledError:
            if w.fut.done() and not w.fut.cancelled():
                self.leave(int_id)  # granted just as the client left: give it back
            else:
                self._forget(int_id, w)
            raise

    def leave(self, int_id: int) -> None:
        n = self.active.get(int_id, 0) - 1
        if n > 0:
            self.active[int_id] = n
            self._drain_if_overdue()  # deadlines pass between events: look at every one
            return
        self.active.pop(int_id, None)
        self.draining.discard(int_id)
        self._grant()

    # -- the rules --------------------------------------------------------------------------
    def _may_enter(self, int_id: int) -> bool:
        if int_id in self.active:
            return int_id not in self.draining and int_id not in self.waiting
        return len(self.active) < self.slots and not self.waiting

    def _grant(self) -> None:
        """Fill free slots: overdue adapters first (oldest waiter first), then the adapter
        with the most waiting requests (ties: the oldest waiter)."""
        while len(self.active) < self.slots and self.waiting:
            now = self.clock()
            overdue = [(q[0].since, i) for i, q in self.waiting.items()
                       if now - q[0].since >= self.deadline_s]
            if overdue:
                i = min(overdue)[1]
            else:
                i = max(self.waiting, key=lambda k: (len(self.waiting[k]), -self.waiting[k][0].since))
            q = self.waiting.pop(i)
            self.active[i] = self.active.get(i, 0) + len(q)
            for w in q:
                w.fut.set_result(None)
        self._drain_if_overdue()

    def _drain_if_overdue(self) -> None:
        """With requests past their deadline and no free slot, stop feeding as many slot
        holders as there are overdue adapters (the fewest requests in the engine first), so
        that as many slots free, each within one request's lifetime. One at a time made the
        k-th overdue adapter wait k lifetimes (the rarest decile's tail)."""
        if len(self.active) < self.slots:
            return
        now = self.clock()
        overdue = sum(now - q[0].since >= self.deadline_s for q in self.waiting.values())
        need = overdue - len(self.draining)
        if need <= 0:
            return
        holders = sorted((n, i) for i, n in self.active.items() if i not in self.draining)
        self.draining.update(i for _, i in holders[:need])

    def _forget(self, int_id: int, w: _Waiter) -> None:
        q = self.waiting.get(int_id)
        if q is not None and w in q:
            q.remove(w)
            if not q:
                del self.waiting[int_id]

    def tick(self) -> None:
        """Re-check deadlines (every enter and leave does; for an idle moment)."""
        self._drain_if_overdue()
