"""LoRA affinity across replicas: `vllm:lora_requests_info` in the names clients send.

The Gateway API Inference Extension's endpoint picker reads, from each replica's /metrics, the
`vllm:lora_requests_info` series with the largest value (a timestamp) and its labels
`running_lora_adapters` / `waiting_lora_adapters` (comma-separated) and `max_lora`; it routes a
request to a replica whose lists hold the request's `model`, and counts names listed against
`max_lora` for room to load one more. loraplex writes that series (and the same under
`loraplex_lora_requests_info`) with every reference of each version: aliases, bare names,
`name@N`. Fast tests use the manager and the app over the fake engine; the last one a real
`loraplex serve`.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.adapters.registry import Registry
from loraplex.server.lora_manager import AdapterManager
from loraplex.server.metrics import VLLM_LORA_INFO
from loraplex.server.settings import ServerSettings
from tests.server.conftest import run_manager
from tests.server.test_app_unit import FakeEngine


def distinct(adapter: Path, root: Path, note: str) -> Path:
    """A copy of `adapter` with distinct content (a new version when pushed)."""
    d = root / note
    shutil.copytree(adapter, d)
    (d / "NOTES.txt").write_text(note)
    return d


@pytest.fixture
def registry(tmp_path, toy_model_dir, one_step_lora):
    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}", str(tmp_path / "art"))
    reg.register_base("toy", toy_model_dir)
    reg.push(distinct(one_step_lora, tmp_path, "bot1"), "bot", base="toy")
    reg.push(distinct(one_step_lora, tmp_path, "bot2"), "bot", base="toy")
    reg.set_alias("bot", "prod", 1)
    reg.set_alias("bot", "canary", "1:90,2:10")
    reg.push(one_step_lora, "solo", base="toy")
    yield reg
    reg.close()


def settings_for(tmp_path, toy_model_dir, **kw) -> ServerSettings:
    return ServerSettings(home=tmp_path, model=toy_model_dir, served_model_name="toy",
                          base_name="toy", api_keys=["k"], max_lora_rank=8, max_loras=4, **kw)


BOT1 = ["bot", "bot:canary", "bot:prod", "bot@1"]
BOT2 = ["bot:canary", "bot:latest", "bot@2"]
SOLO = ["solo", "solo:latest", "solo@1"]


def test_running_lists_every_name_of_a_version_with_requests(tmp_path, toy_model_dir, registry):
    async def body(m: AdapterManager, engine):
        v = {r: m.snapshot.resolve(r) for r in ("bot@1", "bot@2", "solo")}
        assert m.lora_requests_info() == ([], [], 4)  # nothing held, nothing hot
        await m.acquire(v["bot@1"])
        assert m.lora_requests_info() == (BOT1, [], 4 + len(BOT1) - 1)
        await m.acquire(v["bot@2"])
        await m.acquire(v["solo"])
        running, waiting, max_lora = m.lora_requests_info()
        assert running == sorted(set(BOT1 + BOT2 + SOLO)) and waiting == []
        # three adapter versions with requests: room for one more of the engine's 4 slots,
        # the picker's test `names listed < max_lora` says exactly that
        assert len(running) < max_lora and len(running) + 1 == max_lora
        m.release(v["bot@1"])
        assert m.lora_requests_info()[0] == sorted(set(BOT2 + SOLO))
        # idle in one of the engine's batch slots: listed, but it leaves the room as it is
        running, _, max_lora = m.lora_requests_info(hot={v["bot@1"].lora_int_id})
        assert running == sorted(set(BOT1 + BOT2 + SOLO)) and max_lora - len(running) == 2

    run_manager(settings_for(tmp_path, toy_model_dir), registry, body, FakeEngine())


def test_waiting_for_a_load_or_for_a_slot(tmp_path, toy_model_dir, registry):
    async def body(m: AdapterManager, engine):
        v = {r: m.snapshot.resolve(r) for r in ("bot@1", "solo")}
        gate = asyncio.Event()
        add = engine.add_lora

        async def slow_add(lora):
            await gate.wait()
            await add(lora)

        engine.add_lora = slow_add
        waiter = asyncio.create_task(m.acquire(v["bot@1"]))
        await asyncio.sleep(0.3)
        assert m.lora_requests_info() == ([], BOT1, 4 + len(BOT1) - 1)
        gate.set()
        await waiter
        assert m.lora_requests_info() == (BOT1, [], 4 + len(BOT1) - 1)

        # in the engine, vLLM's scheduler says whether it runs or waits for a batch slot
        await m.acquire(v["solo"])
        only_waiting = (set(), {"solo@1"})
        assert m.lora_requests_info(engine=only_waiting)[:2] == (BOT1, SOLO)
        # vLLM 0.32 lists a running request's adapter as waiting too: running it is
        both = ({"solo@1"}, {"solo@1", "bot@2"})  # bot@2: no request here, a stale name
        running, waiting, max_lora = m.lora_requests_info(engine=both)
        assert running == sorted(set(BOT1 + SOLO)) and waiting == []
        assert len(running) + len(waiting) - max_lora == 2 - 4  # two versions with requests

    run_manager(settings_for(tmp_path, toy_model_dir), registry, body, FakeEngine())


def affinity_samples(text: str) -> dict[str, list]:
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    return {name: fams[name].samples for name in (VLLM_LORA_INFO, "loraplex_lora_requests_info")}


def listed(sample, label: str) -> list[str]:
    return [n for n in sample.labels[label].split(",") if n]


def promtool_problems(text: str) -> list[str]:
    """promtool check metrics's complaints about `text` (skips if promtool is missing)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (make setup installs Debian's prometheus)")
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                       text=True)
    problems = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert (r.returncode == 0) == (not problems), (r.returncode, problems)
    return problems


def check_exposition(text: str) -> None:
    """One family of vLLM's name (two would make the scrape unparseable); our series pass
    `promtool check metrics`; under vLLM's name the affinity series draws only promtool's lint
    about `:` (vLLM's naming); and the whole page parses for promtool, whose only complaints
    are about vLLM's own names (`:`, and e.g. `vllm:iteration_tokens_total` for a histogram)."""
    assert text.count(f"# TYPE {VLLM_LORA_INFO} ") == 1
    lines = text.splitlines()
    ours = "\n".join(ln for ln in lines if "loraplex_" in ln) + "\n"
    assert promtool_problems(ours) == []
    family = "\n".join(ln for ln in lines if VLLM_LORA_INFO in ln) + "\n"
    assert promtool_problems(family) == [f"{VLLM_LORA_INFO} metric names should not contain ':'"]
    for problem in promtool_problems(text):
        assert problem.startswith("vllm:"), problem  # not a parse error, nothing of ours


def test_metrics_replace_vllms_series_and_name_the_alias(tmp_path, toy_model_dir, registry):
    from fastapi.testclient import TestClient
    from prometheus_client import REGISTRY, Gauge

    from loraplex.server.app import create_app

    # vLLM's own series, as its stat logger writes it in the server process
    theirs = Gauge(VLLM_LORA_INFO, "Running stats on lora requests.",
                   ["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
    theirs.labels("4", "", "solo@1").set(time.time() - 10)
    theirs.labels("4", "", "bot@1").set_to_current_time()
    try:
        app = create_app(settings_for(tmp_path, toy_model_dir), FakeEngine(), registry=registry)
        with TestClient(app) as c:
            c.headers["Authorization"] = "Bearer k"
            text = c.get("/metrics").text
            samples = affinity_samples(text)
            for name, got in samples.items():
                assert len(got) == 1, (name, got)
                assert listed(got[0], "running_lora_adapters") == [], name
                assert got[0].labels["max_lora"] == "4"
            r = c.post("/v1/chat/completions", json={
                "model": "bot:prod", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
            t0 = time.time()
            text = c.get("/metrics").text
            check_exposition(text)
            samples = affinity_samples(text)
            ours, vllm_named = samples["loraplex_lora_requests_info"][0], samples[VLLM_LORA_INFO][0]
            assert ours.labels == vllm_named.labels
            # done, but in one of the (fake) engine's batch slots: a replica to route it to
            assert listed(vllm_named, "running_lora_adapters") == BOT1
            assert listed(vllm_named, "waiting_lora_adapters") == []
            assert int(vllm_named.labels["max_lora"]) == 4 + len(BOT1)
            assert abs(vllm_named.value - t0) < 5  # the picker takes the largest: the latest
            # vLLM's own gauge keeps only its latest series (it never drops one itself)
            [kept] = [s for f in theirs.collect() for s in f.samples]
            assert kept.labels["running_lora_adapters"] == "bot@1"
    finally:
        REGISTRY.unregister(theirs)


# -- through `loraplex serve` ----------------------------------------------------------------

@pytest.mark.engine
def test_serve_lists_the_alias_while_its_request_runs(served, test_loras):
    name = f"affine-{uuid.uuid4().hex[:8]}"
    served.registry.push(test_loras["reverse"], name, alias="prod", base="toy")
    headers = {"Authorization": "Bearer test-key"}
    started, done = threading.Event(), threading.Event()
    lines: list[str] = []

    def stream():
        body = {"model": f"{name}:prod", "stream": True, "max_tokens": 200, "ignore_eos": True,
                "temperature": 0, "messages": [{"role": "user", "content": "cat dog"}]}
        try:
            with httpx.stream("POST", served.v1 + "/chat/completions", json=body,
                              headers=headers, timeout=300) as r:
                for ln in r.iter_lines():
                    if ln:
                        lines.append(ln)
                    if '"content"' in ln:
                        started.set()
        finally:
            started.set()
            done.set()

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    assert started.wait(120)
    text = httpx.get(served.url + "/metrics", timeout=30).text
    scraped_at = time.time()
    mid_stream = not done.is_set()
    t.join(300)
    assert lines and lines[-1] == "data: [DONE]", lines[-3:]
    assert mid_stream, "the request ended before /metrics was read: make it longer"
    check_exposition(text)
    samples = affinity_samples(text)
    assert len(samples[VLLM_LORA_INFO]) == 1  # ours, not vLLM's `name@N`-only series
    got = samples[VLLM_LORA_INFO][0]
    running = listed(got, "running_lora_adapters")
    assert {name, f"{name}:prod", f"{name}:latest", f"{name}@1"} <= set(running), running
    assert got.labels == samples["loraplex_lora_requests_info"][0].labels
    assert abs(got.value - scraped_at) < 10
    # the picker's capacity test counts versions with requests, not names
    waiting = listed(got, "waiting_lora_adapters")
    assert len(running) + len(waiting) < int(got.labels["max_lora"])


def test_concurrent_requests_for_a_just_pushed_adapter_all_resolve(tmp_path, toy_model_dir,
                                                                   registry, one_step_lora):
    """Pushed after the server's last poll, asked for by several requests at once: the first
    refresh brings it in, and the requests that waited for that refresh find it too (they used
    to get a 404 because their own refresh saw no new revision)."""
    settings = settings_for(tmp_path, toy_model_dir, poll_interval_s=3600)

    async def body(m, engine):
        registry.push(distinct(one_step_lora, tmp_path, "fresh"), "fresh", base="toy")
        found = await asyncio.gather(*(m.resolve("fresh", None) for _ in range(4)))
        return [v.ref for v in found]

    assert run_manager(settings, registry, body, FakeEngine()) == ["fresh@1"] * 4
