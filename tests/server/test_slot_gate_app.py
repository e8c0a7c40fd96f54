"""The slot gate in the request path (fake engine): with `lora_slot_gate`, concurrent requests
over more adapters than `max_loras` all succeed, and the engine never holds more than
`max_loras` adapters' requests at once."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi.testclient import TestClient

from loraplex.adapters.registry import Registry
from loraplex.server.app import create_app
from loraplex.server.settings import ServerSettings
from tests.server.test_app_unit import FakeEngine


class Watching(FakeEngine):
    """Records the most distinct adapters it had in flight at once."""

    def __init__(self):
        super().__init__(delay=0.05)
        self.now: dict[int, int] = {}
        self.most = 0

    async def generate(self, req):
        i = req.lora.int_id if req.lora else 0
        self.now[i] = self.now.get(i, 0) + 1
        self.most = max(self.most, len([k for k, n in self.now.items() if n and k]))
        try:
            async for chunk in super().generate(req):
                yield chunk
        finally:
            self.now[i] -= 1


@pytest.mark.parametrize("gated", [True, False])
def test_gate_keeps_the_engine_within_max_loras(tmp_path, toy_model_dir, one_step_lora, gated):
    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}", str(tmp_path / "art"))
    reg.register_base("toy", toy_model_dir)
    names = [f"g{i}" for i in range(5)]
    for n in names:
        reg.push(one_step_lora, n, base="toy")
    settings = ServerSettings(home=tmp_path, model=toy_model_dir, served_model_name="toy",
                              max_lora_rank=8, max_loras=2, lora_slot_gate=gated)
    engine = Watching()
    app = create_app(settings, engine, registry=reg)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t", timeout=60) as c:
            bodies = [{"model": names[k % 5], "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 2} for k in range(40)]
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=b) for b in bodies))

    with TestClient(app):
        codes = [r.status_code for r in asyncio.run(main())]
        gate = app.state.loraplex.serving.chat.admission.slots
        assert gate is None or (gate.active == {} and gate.waiting == {})
    assert codes == [200] * 40
    # Without the gate the engine gets all five adapters at once (vLLM would skip three).
    assert engine.most == (2 if gated else 5)
