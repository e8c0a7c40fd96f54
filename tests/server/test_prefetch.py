"""Adapter prefetch: which requests announce their adapter to the engine before going in.

The rule (server/lora_manager.py `_prefetch`): an adapter outside the `max_cpu_loras` most
recently requested is probably not in vLLM's host LRU, so its request announces it and the
engine reads it on a worker thread (server/engine/core.py `_worker_prefetch_lora`). Here over a
fake engine that records the announcements; the real engine's side (the reads counted as
prefetched, every answer unchanged under churn) is in tests/server/test_churn.py.
"""

from __future__ import annotations

import asyncio

from tests.server.conftest import run_manager
from tests.server.test_app_unit import FakeEngine
from tests.server.test_disk_cache import registry_with, settings_for


class PrefetchEngine(FakeEngine):
    def __init__(self):
        super().__init__()
        self.announced: list[str] = []

    async def prefetch_lora(self, lora):
        self.announced.append(lora.name)


def _announced(tmp_path, toy_model_dir, one_step_lora, order, **kw) -> list[str]:
    names = sorted(set(order))
    reg, _ = registry_with(tmp_path, toy_model_dir, one_step_lora, names)
    settings = settings_for(tmp_path, toy_model_dir, 1 << 30, max_cpu_loras=2, **kw)

    async def body(m, engine):
        for name in order:
            v = m.snapshot.resolve(name)
            await m.acquire(v)
            m.release(v)
        await asyncio.sleep(0)  # the announcements run as tasks
        return engine.announced

    try:
        return run_manager(settings, reg, body, PrefetchEngine())
    finally:
        reg.close()


def test_only_adapters_outside_the_recent_host_window_are_announced(
        tmp_path, toy_model_dir, one_step_lora):
    order = ["a", "b", "c",  # first loads: add_lora puts each in the host cache, no announcement
             "a",            # not among the last 2 (b, c): announced
             "a", "c",       # among the last 2: not
             "b"]            # not (a, c): announced
    assert _announced(tmp_path, toy_model_dir, one_step_lora, order) == ["a", "b"]


def test_lora_prefetch_off_announces_nothing(tmp_path, toy_model_dir, one_step_lora):
    order = ["a", "b", "c", "a", "b"]
    assert _announced(tmp_path, toy_model_dir, one_step_lora, order, lora_prefetch=False) == []
