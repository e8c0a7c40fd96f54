"""Correctness under adapter churn: every answer is the one its version gives when served alone.

More adapter versions than the engine's GPU slots (`max_loras` 2) and host slots
(`max_cpu_loras` 8) take concurrent greedy traffic while new versions are pushed, aliases move
and adapters are unloaded by the admin API. The class of bug this guards against: a slot
evicted or reused under an in-flight request, which then decodes with another adapter's weights
(vLLM fixed one such in 2026), or a name resolving to one version while another's weights run.

Each version is a copy of the `upper` or `reverse` test adapter (every copy made unique by a
negligible change to one weight, so each push is a new version with its own slot), so its
behaviour is known from its version number; the `x-loraplex-model` header says which version
answered. References are each behaviour's greedy answers served alone, before the churn.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.engine

NAMES = 12  # > max_cpu_loras (8) > max_loras (2) of the test server
REQUESTS = 520
CONCURRENCY = 16
MAX_TOKENS = 8


def variant(src: Path, dest: Path, k: int) -> Path:
    """`src` with one LoRA weight moved by k * 1e-6: new content, the same greedy answers."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    f = dest / "adapter_model.safetensors"
    tensors = load_file(f)
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += k * 1e-6
    save_file(tensors, f, metadata={"format": "pt"})
    return dest


def test_answers_stay_right_while_adapters_churn(served, test_loras, task_prompts, tmp_path):
    reg = served.registry
    prompts = [q for q, _ in task_prompts("upper", 4, 11)]
    serial = iter(range(1, 10_000))
    behaviour: dict[str, str] = {}  # version ref -> "upper" | "reverse"
    lock = threading.Lock()

    def push(name: str, task: str, alias: bool = True) -> str:
        d = variant(test_loras[task], tmp_path / f"v{next(serial)}", next(serial))
        res = reg.push(d, name, base="toy")
        assert res.created
        with lock:
            behaviour[res.version.ref] = task
        if alias:
            reg.set_alias(name, "prod", res.version.version)
        return res.version.ref

    names = [f"churn{i}" for i in range(NAMES)]
    for i, name in enumerate(names):
        push(name, "upper" if i % 2 == 0 else "reverse")

    def body(model: str, prompt: str) -> dict:
        return {"model": model, "messages": [{"role": "user", "content": prompt}],
                "temperature": 0, "max_tokens": MAX_TOKENS}

    headers = {"Authorization": "Bearer test-key"}
    ref: dict[tuple[str, str], str] = {}
    with httpx.Client(base_url=served.v1, headers=headers, timeout=120) as c:
        for task, model in (("upper", "churn0"), ("reverse", "churn1"), ("base", "toy")):
            for p in prompts:
                r = c.post("/chat/completions", json=body(model, p))
                assert r.status_code == 200, r.text
                ref[task, p] = r.json()["choices"][0]["message"]["content"]
    for p in prompts:  # the check can tell the behaviours apart
        assert len({ref["upper", p], ref["reverse", p], ref["base", p]}) == 3, p

    stop = threading.Event()
    churned = Counter()

    def churn() -> None:
        r = random.Random(1)
        admin = httpx.Client(base_url=served.url, timeout=60,
                             headers={"Authorization": f"Bearer {served.admin_key}"})
        while not stop.is_set():
            name = r.choice(names)
            action = r.random()
            if action < 0.5:  # a new version, aliased (the latest and :prod move to it)
                push(name, r.choice(["upper", "reverse"]))
                churned["pushed"] += 1
            elif action < 0.75:  # move :prod back to an older version
                versions = [v for v in behaviour if v.startswith(name + "@")]
                reg.set_alias(name, "prod", int(r.choice(versions).split("@")[1]))
                churned["alias moved"] += 1
            else:  # unload a version from the engine while requests may use it
                with lock:
                    target = r.choice(sorted(behaviour))
                admin.post(f"/admin/adapters/{target}/unload").raise_for_status()
                churned["unloaded"] += 1
            time.sleep(0.15)
        admin.close()

    async def traffic() -> list[tuple[str, str, str, str]]:
        r = random.Random(2)
        jobs = []
        for _ in range(REQUESTS):
            name = r.choice(names)
            with lock:
                versions = [v for v in behaviour if v.startswith(name + "@")]
            form = r.random()
            model = ("toy" if form < 0.1 else name if form < 0.4
                     else f"{name}:prod" if form < 0.7 else r.choice(versions))
            jobs.append((model, r.choice(prompts)))
        sem = asyncio.Semaphore(CONCURRENCY)
        async with httpx.AsyncClient(base_url=served.v1, headers=headers, timeout=300) as ac:
            async def one(model: str, prompt: str):
                async with sem:
                    resp = await ac.post("/chat/completions", json=body(model, prompt))
                assert resp.status_code == 200, (model, resp.text)
                return (model, prompt, resp.headers["x-loraplex-model"],
                        resp.json()["choices"][0]["message"]["content"])
            return await asyncio.gather(*(one(m, p) for m, p in jobs))

    worker = threading.Thread(target=churn, daemon=True)
    worker.start()
    try:
        results = asyncio.run(traffic())
    finally:
        stop.set()
        worker.join(timeout=60)
    wrong = []
    for model, prompt, answered, text in results:
        if "@" in model:
            assert answered == model  # a pinned version is never swapped
        task = "base" if answered == "toy" else behaviour[answered]
        if text != ref[task, prompt]:
            wrong.append((model, answered, task, prompt, text, ref[task, prompt]))
    served_versions = {a for _, _, a, _ in results}
    print(f"\n{len(results)} requests over {len(served_versions)} versions; churn: "
          f"{dict(churned)}; mismatches: {len(wrong)}")
    assert len(results) >= 500 and len(served_versions) > 8  # more than the host slots
    assert churned["pushed"] and churned["alias moved"] and churned["unloaded"]
    assert not wrong, wrong[:5]
    # ... with the engine's host cache (8) too small for the versions in use, the reads of
    # evicted adapters went through the prefetch path (a worker thread, started as their
    # requests arrived: server/lora_manager.py `_prefetch`), and none of them changed an answer.
    metrics = httpx.get(f"{served.url}/metrics", headers=headers).text
    reads = by_label(metrics, "loraplex_engine_adapter_reads_total", "how")
    print(f"engine adapter reads: {reads}")
    assert reads["prefetched"] > 0, reads
    # ... and while the server's automatic pins (auto_pin 2 over the last 40 requests, see the
    # `served` fixture) followed the traffic: made, released, and unloaded with their versions.
    pins = by_label(metrics, "loraplex_auto_pin_changes_total", "action")
    print(f"automatic pins: {pins}")
    assert pins.get("pin", 0) > 0 and pins.get("unpin", 0) > 0, pins


def by_label(metrics: str, sample: str, label: str) -> dict[str, float]:
    """The values of one counter's samples in a /metrics text, by the value of `label`."""
    return {s.labels[label]: s.value for fam in text_string_to_metric_families(metrics)
            for s in fam.samples if s.name == sample}
