"""The adapter disk cache keeps `adapter_cache_bytes` while serving more adapters than fit.

Fast tests run the AdapterManager (directly, or through the app) over the fake engine, a real
registry and a real disk; the last test serves through a real `loraplex serve` whose engine
keeps fewer adapters in host memory than are served, so vLLM re-reads evicted-then-refetched
adapter files from disk, and checks every answer against the same adapter served from cache.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from loraplex.adapters.errors import AdapterInvalid
from loraplex.adapters.registry import Registry
from loraplex.server.lora_manager import AdapterManager
from loraplex.server.settings import ServerSettings
from tests.server.conftest import run_manager
from tests.server.test_app_unit import FakeEngine


def cache_bytes(cache: Path) -> int:
    """Everything under the cache directory, hidden and partial files included."""
    return sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())


def entries(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir()}


def registry_with(tmp_path: Path, toy_model_dir: Path, adapter: Path, names: list[str]):
    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}", str(tmp_path / "art"))
    reg.register_base("toy", toy_model_dir)
    for name in names:
        reg.push(adapter, name, base="toy")
    return reg, reg.resolve(names[0]).total_size


def settings_for(tmp_path: Path, toy_model_dir: Path, cap: int, **kw) -> ServerSettings:
    return ServerSettings(home=tmp_path, model=toy_model_dir, served_model_name="toy",
                          base_name="toy", api_keys=["k"], max_lora_rank=8,
                          adapter_cache_bytes=cap, **kw)


class CountingEngine(FakeEngine):
    def __init__(self):
        super().__init__()
        self.added: list[tuple[int, str]] = []

    async def add_lora(self, lora):
        self.added.append((lora.int_id, lora.path))
        await super().add_lora(lora)


def index_matches_disk(m: AdapterManager) -> None:
    cache = m.settings.cache_dir
    on_disk = {p.name: cache_bytes(p) for p in cache.iterdir() if p.is_dir()}
    assert {n: e.nbytes for n, e in m.cache.entries.items()} == on_disk
    assert m.cache.nbytes == sum(on_disk.values()) and m.cache.reserved == 0


# -- through serving (fake engine) -------------------------------------------------------------

def test_serving_more_adapters_than_fit_keeps_the_cap(tmp_path, toy_model_dir, one_step_lora):
    from fastapi.testclient import TestClient

    from loraplex.server.app import create_app

    names = [f"many{i}" for i in range(8)]
    reg, size = registry_with(tmp_path, toy_model_dir, one_step_lora, names)
    cap = max(int(2.5 * size), 1 << 20)  # two fit, not three
    assert cap < 3 * size, "the test adapter is too small for the 1 MiB minimum cap"
    settings = settings_for(tmp_path, toy_model_dir, cap)
    engine = CountingEngine()
    app = create_app(settings, engine, registry=reg)
    with TestClient(app) as c:
        c.headers["Authorization"] = "Bearer k"
        m = app.state.loraplex.manager
        first: dict[str, str] = {}
        for round_ in range(2):
            for name in names:
                r = c.post("/v1/chat/completions", json={
                    "model": name, "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200, r.text
                text = r.json()["choices"][0]["message"]["content"]
                assert first.setdefault(name, text) == text
                assert cache_bytes(settings.cache_dir) <= cap, (round_, name)
                assert len(entries(settings.cache_dir)) <= 2
        index_matches_disk(m)
        assert len(m.loaded) <= 2 and not m._uses  # every request gave its adapter back
        # every adapter was fetched and handed to the engine once per round: evicted between
        ids = {reg.resolve(n).lora_int_id for n in names}
        assert sorted(i for i, _ in engine.added) == sorted(list(ids) * 2)
        text = c.get("/metrics").text
        assert 'loraplex_adapter_loads_total{adapter="many0",result="ok",version="1"} 2.0' in text
        on_disk = [ln for ln in text.splitlines()
                   if ln.startswith("loraplex_adapter_resident{") and 'tier="disk"' in ln]
        assert len(on_disk) == len(entries(settings.cache_dir))
    reg.close()


def test_a_stream_holds_its_adapter_until_it_ends(tmp_path, toy_model_dir, one_step_lora):
    """Streams release after run() returned: the hold ends with the response, not before."""
    from fastapi.testclient import TestClient

    from loraplex.server.app import create_app

    reg, _ = registry_with(tmp_path, toy_model_dir, one_step_lora, ["streamed"])
    settings = settings_for(tmp_path, toy_model_dir, 1 << 30)
    app = create_app(settings, FakeEngine(), registry=reg)
    v = reg.resolve("streamed")
    with TestClient(app) as c:
        c.headers["Authorization"] = "Bearer k"
        m = app.state.loraplex.manager
        with c.stream("POST", "/v1/chat/completions", json={
                "model": "streamed", "stream": True,
                "messages": [{"role": "user", "content": "hi"}]}) as r:
            it = r.iter_lines()
            assert next(it).startswith("data: ")
            assert m._uses.get(v.lora_int_id) == 1  # the body is still being sent
            rest = [ln for ln in it if ln]
        assert rest[-1] == "data: [DONE]"
        assert not m._uses
        # a refused request (over the context) holds nothing either
        r = c.post("/v1/chat/completions", json={"model": "streamed", "max_tokens": 10_000,
                                                 "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 400 and not m._uses
    reg.close()


# -- the manager's rules -------------------------------------------------------------------------

def test_held_and_pinned_versions_stay_then_an_evicted_one_is_fetched_again(
        tmp_path, toy_model_dir, one_step_lora):
    names = [f"rule{i}" for i in range(5)]
    reg, size = registry_with(tmp_path, toy_model_dir, one_step_lora, names)
    cap = max(int(2.5 * size), 1 << 20)
    settings = settings_for(tmp_path, toy_model_dir, cap)

    async def body(m: AdapterManager, engine: CountingEngine):
        v = {n: m.snapshot.resolve(n) for n in names}
        held = await m.acquire(v["rule0"])  # as a request in flight
        await m.pin(v["rule1"])
        for n in names[2:]:
            await m.ensure_loaded(v[n])
        # rule2 and rule3 were evicted for the next one; rule0 (held) and rule1 (pinned) stay,
        # over the cap: there is nothing else to evict
        assert Path(held.path).is_dir() and v["rule0"].lora_int_id in m.loaded
        assert m.loaded[v["rule1"].lora_int_id].pinned
        assert {n.split("@")[0] for n in entries(settings.cache_dir)} == {"rule0", "rule1", "rule4"}
        for n in ("rule2", "rule3"):
            assert v[n].lora_int_id not in m.loaded  # its next request loads it again
        index_matches_disk(m)

        m.release(v["rule0"])
        await m.ensure_loaded(v["rule2"])  # now rule0 is the least recently used, free to go
        assert not Path(held.path).exists() and v["rule0"].lora_int_id not in m.loaded
        assert {n.split("@")[0] for n in entries(settings.cache_dir)} == {"rule1", "rule2"}

        before = len(engine.added)
        again = await m.acquire(v["rule0"])
        assert again == held and Path(again.path).is_dir()  # fetched again, same path
        assert engine.added[before:] == [(held.int_id, held.path)]  # handed to the engine again
        assert (await m.acquire(v["rule0"])) == held and len(engine.added) == before + 1  # a hit
        m.release(v["rule0"])
        m.release(v["rule0"])
        assert not m._uses
        index_matches_disk(m)

    run_manager(settings, reg, body, CountingEngine())
    reg.close()


def test_a_loading_version_is_not_evicted_and_a_failed_load_frees_its_hold(
        tmp_path, toy_model_dir, one_step_lora):
    names = ["slow", "other", "third"]
    reg, size = registry_with(tmp_path, toy_model_dir, one_step_lora, names)
    settings = settings_for(tmp_path, toy_model_dir, 1 << 20)  # one fits

    async def body(m: AdapterManager, engine: CountingEngine):
        v = {n: m.snapshot.resolve(n) for n in names}
        gate = asyncio.Event()
        add = engine.add_lora

        async def slow_add(lora):
            if lora.name == "slow":
                await gate.wait()
            await add(lora)

        engine.add_lora = slow_add
        slow = asyncio.create_task(m.acquire(v["slow"]))
        while not any(n.startswith("slow@") for n in m.cache.entries):
            await asyncio.sleep(0.01)  # fetched, now in the engine's add_lora
        assert m.lora_requests_info()[1]  # waiting for its load
        await m.ensure_loaded(v["other"])  # has to make room, but `slow` is loading
        assert any(n.startswith("slow@") for n in entries(settings.cache_dir))
        gate.set()
        ref = await slow
        assert Path(ref.path).is_dir()
        m.release(v["slow"])

        async def broken(lora):
            raise RuntimeError("engine refused it")

        engine.add_lora = broken
        with pytest.raises(AdapterInvalid):
            await m.acquire(v["third"])
        assert not m._uses and not m._loading and v["third"].lora_int_id not in m.loaded

    run_manager(settings, reg, body, CountingEngine())
    reg.close()


def test_start_indexes_the_cache_once_and_trims_it(tmp_path, toy_model_dir, one_step_lora,
                                                    monkeypatch):
    names = ["kept", "fresh"]
    reg, size = registry_with(tmp_path, toy_model_dir, one_step_lora, names)
    cap = 1 << 20
    settings = settings_for(tmp_path, toy_model_dir, cap)
    cache = settings.cache_dir
    cache.mkdir(parents=True)
    for i, name in enumerate(["older@2-0123456789abcdef", "old@1-0123456789abcdef"]):
        d = cache / name  # left by an earlier run, larger than the cap together
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"\0" * (cap // 2 + 1))
        os.utime(d, (i, i))
    trash = cache / ".evicting-gone@1-0123456789abcdef-12345678"
    trash.mkdir()
    (trash / "x").write_bytes(b"\0" * 100)

    walked: list[Path] = []
    iterdir = Path.iterdir

    def watched(self):
        if self == cache:
            walked.append(self)
        return iterdir(self)

    async def body(m: AdapterManager, engine: CountingEngine):
        assert not trash.exists()  # an eviction a crash interrupted
        assert entries(cache) == {"old@1-0123456789abcdef"}  # the older one went
        index_matches_disk(m)
        monkeypatch.setattr(Path, "iterdir", watched)
        for n in names:
            await m.acquire(m.snapshot.resolve(n))
            m.release(m.snapshot.resolve(n))
        await m.update_residency()
        monkeypatch.setattr(Path, "iterdir", iterdir)
        assert walked == [], "a load or a scrape walked the cache directory"
        assert cache_bytes(cache) <= cap
        index_matches_disk(m)

    run_manager(settings, reg, body, CountingEngine())
    reg.close()


# -- through `loraplex serve` (real engine) ------------------------------------------------------

@pytest.mark.engine
def test_serve_past_the_cap_answers_like_the_cached_adapter(toy_model_dir, test_loras,
                                                             tmp_path):
    import httpx

    from tests.server.conftest import start_server
    from tests.services import free_port, server_env, stop_server

    home = tmp_path / "home"
    home.mkdir()
    reg = Registry(f"sqlite:///{home / 'registry.db'}", str(home / "artifacts"))
    reg.register_base("toy", toy_model_dir)
    # 8 versions under 6 names (two with a second version of the other content)
    plan = [("cu0", "upper"), ("cr0", "reverse"), ("cu1", "upper"), ("cr1", "reverse"),
            ("cv", "upper"), ("cv", "reverse"), ("cw", "reverse"), ("cw", "upper")]
    for name, task in plan:
        reg.push(test_loras[task], name, base="toy")
    refs = [f"{n}@1" for n in ("cu0", "cr0", "cu1", "cr1", "cv", "cw")] + ["cv@2", "cw@2"]
    size = max(reg.resolve(r).total_size for r in refs)
    cap = max(int(2.5 * size), 1 << 20)
    assert cap < 3 * size
    port = free_port()
    # vLLM's host cache holds 2 adapters: served again after an eviction, an adapter is read
    # from the re-fetched files
    env = server_env(home, port, LORAPLEX_ADAPTER_CACHE_BYTES=str(cap),
                     LORAPLEX_MAX_CPU_LORAS="2", LORAPLEX_MAX_LORAS="2")
    log = home / "server.log"
    proc = start_server(toy_model_dir, env, log)
    cache = home / "cache"
    headers = {"Authorization": "Bearer test-key"}
    question = "cat dog bird"

    def ask(client, model: str) -> str:
        r = client.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": question}],
            "max_tokens": 12, "temperature": 0}, headers=headers, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            cached: dict[str, str] = {}
            for ref in refs:
                cold = ask(c, ref)  # fetched (evicting another)
                assert cache_bytes(cache) <= cap, ref
                cached[ref] = ask(c, ref)  # served from the cache
                assert cold == cached[ref], ref
                assert cache_bytes(cache) <= cap, ref
            # the adapters really differ, and one content answers alike under every name
            task_of = {r: t for r, (_, t) in zip(refs, _order(plan, refs))}
            by_task = {task: {cached[r] for r in refs if task_of[r] == task}
                       for task in ("upper", "reverse")}
            assert len(by_task["upper"]) == 1 and len(by_task["reverse"]) == 1, by_task
            assert by_task["upper"] != by_task["reverse"]

            for ref in refs:  # all but the last two were evicted: fetched again
                assert ask(c, ref) == cached[ref], ref
                assert cache_bytes(cache) <= cap, ref
            text = c.get("/metrics").text
            assert 'loraplex_adapter_loads_total{adapter="cu0",result="ok",version="1"} 2.0' in text

            async def together():
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as ac:
                    async def one(ref):
                        r = await ac.post("/v1/chat/completions", json={
                            "model": ref, "messages": [{"role": "user", "content": question}],
                            "max_tokens": 12, "temperature": 0}, headers=headers, timeout=300)
                        assert r.status_code == 200, r.text
                        return r.json()["choices"][0]["message"]["content"]
                    return await asyncio.gather(*(one(r) for r in refs * 2))

            # all at once: loads evict only what no request holds, so no in-flight adapter's
            # files go while the engine may read them
            got = asyncio.run(together())
            assert got == [cached[r] for r in refs * 2]
            # once they are done, the cap holds again (the last release trims the cache)
            deadline = time.monotonic() + 10
            while cache_bytes(cache) > cap:
                assert time.monotonic() < deadline, cache_bytes(cache)
                time.sleep(0.2)
        assert "Traceback" not in log.read_text()
    finally:
        stop_server(proc)
        reg.close()


def _order(plan, refs):
    """(name, task) of each ref, in refs order (versions count per name in push order)."""
    seen: dict[str, int] = {}
    out = {}
    for name, task in plan:
        seen[name] = seen.get(name, 0) + 1
        out[f"{name}@{seen[name]}"] = (name, task)
    return [out[r] for r in refs]
