"""auto_pin: the most requested adapters are pinned in the engine's host cache, following traffic.

Fast tests of the AdapterManager's rules over a fake engine that tracks what it holds pinned and
a real registry. The engine calls themselves (a pin and its release in vLLM's worker) run on the
real engine in `test_serve.py::test_admin_registers_an_uploaded_archive_then_pins_it`, and under
Zipf traffic in `benchmarks/many_adapters.py --variant auto-pin=LORAPLEX_AUTO_PIN=24`.
"""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from loraplex.server.settings import ServerSettings
from tests.server.conftest import run_manager
from tests.server.test_app_unit import FakeEngine
from tests.server.test_disk_cache import registry_with, settings_for


class PinTrackingEngine(FakeEngine):
    """Holds pins as vLLM's host LRU does: only an adapter it holds, released only if held."""

    def __init__(self):
        super().__init__()
        self.pins: set[int] = set()
        self.fail_pins = 0  # the next n pin calls fail

    async def pin_lora(self, lora):
        assert lora.int_id in self.loras, "pinned before it was added"
        if self.fail_pins:
            self.fail_pins -= 1
            raise RuntimeError("the engine said no")
        self.pins.add(lora.int_id)

    async def unpin_lora(self, lora):
        assert lora.int_id in self.pins, "released a pin the engine does not hold"
        self.pins.discard(lora.int_id)


async def traffic(m, names: str) -> None:
    """One request per letter (acquired and released, as the serving path does), then let any
    re-ranking the requests started finish."""
    for name in names:
        v = m.snapshot.resolve(name)
        await m.acquire(v)
        m.release(v)
        await asyncio.sleep(0)
    while m._rebalancing is not None:
        await asyncio.sleep(0)


def pinned(m, engine, how: str | None = None) -> set[str]:
    """Names pinned, checked to agree between the manager and the engine."""
    by_id = {h.ref.int_id: h for h in m.loaded.values()}
    held = {by_id[i].version.name for i in engine.pins}
    assert held == {h.version.name for h in m.loaded.values() if h.pinned}
    if how is None:
        return held
    return {h.version.name for h in m.loaded.values() if h.pinned and h.auto == (how == "auto")}


def gauge(m, how: str) -> float:
    return m.metrics.registry.get_sample_value("loraplex_adapters_pinned", {"how": how})


@pytest.fixture
def manage(tmp_path, toy_model_dir, one_step_lora):
    """manage(body, engine=None, **settings): run `body(manager, engine)` over five adapters
    a..e, one batch slot and a 20-request window, unless `settings` say otherwise."""
    reg, size = registry_with(tmp_path, toy_model_dir, one_step_lora, list("abcde"))

    def run(body, engine=None, **kw):
        kw = {"max_loras": 1, "auto_pin_window": 20, **kw}
        settings = settings_for(tmp_path, toy_model_dir, cap=size * 10, **kw)
        run_manager(settings, reg, body, engine or PinTrackingEngine())
        return settings
    yield run
    reg.close()


def test_auto_pins_follow_traffic(manage):
    async def body(m, engine):
        await traffic(m, "aabacabdae" * 2)  # a 12, b 4, c 2, d 1, e 1
        assert pinned(m, engine, "auto") == {"a", "b"} and gauge(m, "auto") == 2
        # The window moves on: a and b leave it, c and d take the top two places.
        await traffic(m, "cdcdcdcdcd" * 2)
        assert pinned(m, engine) == {"c", "d"}
        assert m.metrics.registry.get_sample_value(
            "loraplex_auto_pin_changes_total", {"action": "unpin"}) == 2
        # Adapters asked for once in the window are not popular, whatever their rank.
        await traffic(m, "abe" + "c" * 17)
        assert pinned(m, engine) == {"c"}

    # 4 host places, 1 batch slot: up to 3 pins; 2 automatic; re-ranked every 5 requests
    manage(body, max_cpu_loras=4, auto_pin=2)


def test_a_pin_changes_hands_only_for_twice_the_requests(manage):
    async def body(m, engine):
        await traffic(m, "aabababaab" * 2)  # a 12, b 8
        assert pinned(m, engine) == {"a"}
        # b overtakes a (12 to 8 at the end, 11 to 9 at the re-ranking after 5 of them): a
        # rule without a margin would hand the pin to b here, and back at the next turn.
        await traffic(m, "bbbbbb")
        assert pinned(m, engine) == {"a"}
        await traffic(m, "bbbbbb")  # b 16, a 4: twice as often, and a is out of the top
        assert pinned(m, engine) == {"b"}

    manage(body, max_cpu_loras=4, auto_pin=1)


def test_an_operators_pin_comes_before_traffics(manage):
    async def body(m, engine):
        await traffic(m, "aaabaaabab" * 2)  # a 14, b 6
        assert pinned(m, engine, "auto") == {"a", "b"}
        # No room left, yet the operator's pin is not a 409: the least requested automatic
        # pin (b) makes way for it.
        await m.pin(m.snapshot.resolve("c"))
        assert pinned(m, engine, "admin") == {"c"} and pinned(m, engine, "auto") == {"a"}
        # Pinning an automatically pinned adapter makes it the operator's: traffic no longer
        # releases it.
        await m.pin(m.snapshot.resolve("a"))
        assert pinned(m, engine, "admin") == {"a", "c"} and not pinned(m, engine, "auto")
        assert (gauge(m, "admin"), gauge(m, "auto")) == (2, 0)
        await traffic(m, "bbbbbbbbbbbbbbbbbbbb")  # b is all the traffic now; c and a none
        assert pinned(m, engine) == {"a", "c"}
        # The operator's release gives the room back to traffic.
        await m.unpin(m.snapshot.resolve("c"))
        await traffic(m, "bbbbb")
        assert pinned(m, engine, "auto") == {"b"} and pinned(m, engine, "admin") == {"a"}

    manage(body, max_cpu_loras=3, auto_pin=2)  # 2 pins in all, automatic until the operator's


def test_a_failed_pin_is_logged_and_retried_and_requests_go_on(manage, caplog):
    engine = PinTrackingEngine()
    engine.fail_pins = 1

    async def body(m, engine):
        await traffic(m, "aaaaa")
        assert not pinned(m, engine) and gauge(m, "auto") == 0
        assert "auto_pin: re-ranking the adapters failed: the engine said no" in caplog.text
        await traffic(m, "aaaaa")  # the next re-ranking
        assert pinned(m, engine) == {"a"}

    manage(body, engine, max_cpu_loras=2, auto_pin=1)


def test_off_by_default_and_no_more_than_the_pin_room(manage, tmp_path):
    async def body(m, engine):
        await traffic(m, "a" * 50)
        assert not engine.pins and not m._traffic  # not even counted

    assert manage(body, max_cpu_loras=4).auto_pin == 0
    with pytest.raises(ValidationError) as e:
        ServerSettings(home=tmp_path, model=tmp_path, max_loras=4, max_cpu_loras=6, auto_pin=3)
    assert "auto_pin is 3" in str(e.value) and "6 - 4 = 2" in str(e.value)
    assert "LORAPLEX_AUTO_PIN" in str(e.value)
