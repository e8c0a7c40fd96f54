"""Pinned adapters stay in vLLM's host memory and leave it room for a full batch of others.

A pin holds the adapter in vLLM's host LRU (`max_cpu_loras`), not in a batch slot (the engine
side and why: `VllmEngine.pin_lora`; the real-engine check that batches max_loras other adapters
beside a pin is `test_serve.py::test_admin_registers_an_uploaded_archive_then_pins_it`). These
fast tests run the AdapterManager over the fake engine and a real registry: the host LRU must
still take max_loras unpinned adapters, so at most max_cpu_loras - max_loras are pinned.
"""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from loraplex.adapters.errors import Conflict
from loraplex.server.settings import ServerSettings
from tests.server.conftest import run_manager
from tests.server.test_app_unit import FakeEngine
from tests.server.test_disk_cache import registry_with, settings_for


class PinCountingEngine(FakeEngine):
    def __init__(self):
        super().__init__()
        self.pinned: list[int] = []

    async def pin_lora(self, lora):
        assert lora.int_id in self.loras, "pinned before it was added"
        self.pinned.append(lora.int_id)


def test_pins_stop_where_a_full_batch_of_others_would_not_fit(tmp_path, toy_model_dir,
                                                                one_step_lora):
    reg, size = registry_with(tmp_path, toy_model_dir, one_step_lora, ["a", "b", "c"])
    # 4 host slots, 2 batch slots: two pins at most
    settings = settings_for(tmp_path, toy_model_dir, cap=size * 10, max_loras=2,
                            max_cpu_loras=4)
    v = {n: reg.resolve(n) for n in ("a", "b", "c")}

    async def body(m, engine):
        await m.pin(v["a"])
        await m.pin(v["a"])  # already pinned: no second engine call, no second place taken
        await m.pin(v["b"])
        assert engine.pinned == [v["a"].lora_int_id, v["b"].lora_int_id]
        with pytest.raises(Conflict) as refused:
            await m.pin(v["c"])
        msg = refused.value.message
        assert "c@1" in msg and "a@1, b@1" in msg and "4 - 2 = 2" in msg
        assert "unpin" in msg and "LORAPLEX_MAX_CPU_LORAS" in msg
        assert refused.value.http_status == 409
        assert not m.loaded[v["c"].lora_int_id].pinned and not m._uses  # nothing held
        await m.unpin(v["a"])
        await m.pin(v["c"])
        assert {m.loaded[x.lora_int_id].pinned for x in (v["b"], v["c"])} == {True}
        assert not m.loaded[v["a"].lora_int_id].pinned

    run_manager(settings, reg, body, PinCountingEngine())
    reg.close()


def test_a_failed_engine_pin_is_not_counted(tmp_path, toy_model_dir, one_step_lora):
    reg, size = registry_with(tmp_path, toy_model_dir, one_step_lora, ["a", "b"])
    settings = settings_for(tmp_path, toy_model_dir, cap=size * 10, max_loras=1,
                            max_cpu_loras=2)  # one pin

    class Failing(PinCountingEngine):
        async def pin_lora(self, lora):
            raise RuntimeError("engine said no")

    async def body(m, engine):
        with pytest.raises(RuntimeError):
            await m.pin(reg.resolve("a"))
        engine.pin_lora = PinCountingEngine.pin_lora.__get__(engine)
        await m.pin(reg.resolve("b"))  # the failed pin left its place free
        assert engine.pinned == [reg.resolve("b").lora_int_id]

    run_manager(settings, reg, body, Failing())
    reg.close()


def test_preload_beyond_the_pin_room_is_refused_at_start(tmp_path):
    with pytest.raises(ValidationError) as e:
        ServerSettings(home=tmp_path, model=tmp_path, preload=["a", "b", "c"], max_loras=4,
                       max_cpu_loras=6)
    assert "preload names 3 adapters" in str(e.value) and "6 - 4 = 2" in str(e.value)
    assert ServerSettings(home=tmp_path, model=tmp_path, preload=["a", "b"], max_loras=4,
                          max_cpu_loras=6).preload == ["a", "b"]


def test_a_pin_leaves_the_others_fewer_host_places_for_prefetch(tmp_path, toy_model_dir,
                                                                 one_step_lora):
    """The prefetch rule guesses vLLM's host LRU (`max_cpu_loras` most recent); a pinned
    adapter sits outside its eviction order, so the rest have one place fewer."""
    from tests.server.test_prefetch import PrefetchEngine

    reg, size = registry_with(tmp_path, toy_model_dir, one_step_lora, ["p", "a", "b", "c"])
    settings = settings_for(tmp_path, toy_model_dir, cap=size * 10, max_loras=1,
                            max_cpu_loras=3)  # with p pinned: 2 places for a, b, c

    class Engine(PrefetchEngine, PinCountingEngine):
        pass

    async def use(m, name):
        v = m.snapshot.resolve(name)
        await m.acquire(v)
        m.release(v)
        await asyncio.sleep(0)

    async def body(m, engine):
        await m.pin(m.snapshot.resolve("p"))
        for name in ["a", "b", "c", "p", "a"]:  # a: outside the last 2 (b, c); p: pinned
            await use(m, name)
        assert engine.announced == ["a"]
        await m.unload(m.snapshot.resolve("p"))  # the pin goes with it: 3 places again
        for name in ["c", "a", "b", "c"]:  # b: left the last 2 above; c: among the last 3
            await use(m, name)
        assert engine.announced == ["a", "b"]
        await use(m, "p")  # loaded again by add_lora: in the host LRU, not announced
        await use(m, "a")  # the last 3 were b, c, p: a is announced
        assert engine.announced == ["a", "b", "a"]

    run_manager(settings, reg, body, Engine())
    reg.close()
