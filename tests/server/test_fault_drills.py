"""Server fault drills: what `loraplex serve` does when what it depends on fails.

One real server (vLLM CPU engine, real HTTP) runs over a private PostgreSQL registry and a
private S3 store that the drills crash and restart (tests/faults.py). The drills run in file
order on that one process, each leaving it healthy for the next, and the last one kills its
engine. docs/reliability.md has the table: drill, what was done, expected, observed.

- 3. a corrupt (bytes flipped) or deleted artifact: 400 `adapter_invalid` naming the file,
  nothing in the disk cache, other adapters unaffected; archive + push again recovers.
- 2. the S3 store killed: resident adapters serve; a cold load is a 503 + Retry-After; after
  the restart the same cold load succeeds.
- 1. PostgreSQL crash-stopped: known references serve from the snapshot; an unknown name is a
  503 + Retry-After (not a 404: it may have been pushed meanwhile); a push exits 2 having
  written nothing; after the restart a new push is served, with no server restart.
- 4. the engine core killed: in-flight and new requests end with errors at once, /health and
  /ready answer 503, and SIGTERM still ends the process (nothing hangs).
- 1b. (fake engine, real PostgreSQL) the registry frozen (SIGSTOP): known references serve; an
  unknown name is a 503 after the lookup timeout (5 s), not a hung request; then it recovers.
- 6. (fake engine, real tmpfs) the adapter cache disk full: unused cached adapters are evicted
  and the load retried; with nothing to evict, a 503 and no partial files; then it loads.

SIGTERM draining (5) is drilled in tests/deploy/test_multi_replica.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from loraplex.adapters.registry import Registry
from tests.faults import PrivatePostgres, PrivateS3, fill, tiny_disk
from tests.services import free_port, server_env, spawn_server, stop_server, wait_ready

H = {"Authorization": "Bearer test-key"}


@dataclass
class Drill:
    url: str
    home: Path
    env: dict[str, str]
    proc: subprocess.Popen
    log: Path
    registry: Registry
    pg: PrivatePostgres
    s3: PrivateS3
    adapter: Callable[[str], Path]  # a fresh copy of the test adapter with distinct content

    def chat(self, model: str, timeout: float = 60, **kw) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "cat dog"}],
                "max_tokens": 4, "temperature": 0, **kw}
        return httpx.post(self.url + "/v1/chat/completions", json=body, headers=H,
                          timeout=timeout)

    def ready(self) -> dict:
        return httpx.get(self.url + "/ready", timeout=10).json()

    def cache_entries(self) -> list[str]:
        return sorted(p.name for p in (self.home / "cache").iterdir())


def eventually(check: Callable[[], bool], within: float = 10.0) -> float:
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < within, f"not true within {within} s"
        time.sleep(0.1)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def adapter(toy_model_dir, lora_trainer, tmp_path_factory) -> Callable[[str], Path]:
    """`adapter(note)`: a fresh copy of one quick adapter, made distinct by a NOTES.txt (so
    each push is a new version; what it answers does not matter here)."""
    root = tmp_path_factory.mktemp("adapters")
    one = lora_trainer(toy_model_dir, root / "lora", "upper", rank=8, steps=1)
    copies = iter(range(1000))

    def make(note: str) -> Path:
        d = root / f"copy-{next(copies)}"
        shutil.copytree(one, d)
        (d / "NOTES.txt").write_text(note)
        return d

    return make


@pytest.fixture(scope="module")
def drill(toy_model_dir, adapter, tmp_path_factory):
    root = tmp_path_factory.mktemp("drills")
    pg, s3 = PrivatePostgres(), PrivateS3()

    artifacts = s3.bucket("drills")
    registry = Registry(pg.url, artifacts, storage_options=s3.opts)
    registry.register_base("toy", toy_model_dir)
    for name in ("warm", "cold", "corrupt", "gone"):
        registry.push(adapter(name), name, base="toy")
    registry.set_alias("warm", "prod", 1)
    home, port = root / "home", free_port()
    home.mkdir()
    env = server_env(home, port, LORAPLEX_POLL_INTERVAL_S="0.5",
                     LORAPLEX_REGISTRY_URL=pg.url, LORAPLEX_ARTIFACTS_URL=artifacts,
                     LORAPLEX_S3_ENDPOINT_URL=s3.opts["endpoint_url"],
                     LORAPLEX_S3_KEY=s3.opts["key"], LORAPLEX_S3_SECRET=s3.opts["secret"])
    log = root / "server.log"
    proc = spawn_server(toy_model_dir, env, log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, url, log, timeout=240)
        yield Drill(url, home, env, proc, log, registry, pg, s3, adapter)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        registry.close()
        pg.close()
        s3.close()


def _objects(drill: Drill) -> int:
    fs = drill.registry.store.fs
    fs.invalidate_cache()
    return len(fs.find(drill.registry.store.root))


def _error(r: httpx.Response) -> dict:
    return r.json()["error"]


def _store_path(drill: Drill, name: str, rel: str = "adapter_model.safetensors") -> str:
    v = drill.registry.resolve(name)
    fs, prefix = drill.registry.store._fs_for(v.artifact_uri)
    return f"{prefix}/files/{rel}"


# -- 3. a corrupt or deleted artifact ---------------------------------------------------------

@pytest.mark.engine
@pytest.mark.postgres
@pytest.mark.s3
def test_corrupt_or_deleted_artifact_fails_that_adapter_only(drill: Drill):
    assert drill.chat("warm").status_code == 200  # resident from here on
    fs = drill.registry.store.fs
    path = _store_path(drill, "corrupt")
    data = bytearray(fs.cat_file(path))
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])  # flip bytes, same size
    fs.pipe_file(path, bytes(data))
    fs.rm(_store_path(drill, "gone"))

    r = drill.chat("corrupt")
    assert r.status_code == 400, r.text
    err = _error(r)
    assert err["code"] == "adapter_invalid" and err["param"] == "model"
    assert "adapter_model.safetensors: sha256" in err["message"] and "corrupt" in err["message"]
    r = drill.chat("gone")
    assert r.status_code == 400, r.text
    assert "adapter_model.safetensors: missing" in _error(r)["message"]
    # others unaffected; nothing of the failed downloads in the disk cache
    assert drill.chat("warm").status_code == 200
    assert drill.chat("toy").status_code == 200
    assert not [e for e in drill.cache_entries() if not e.startswith("warm@")], \
        drill.cache_entries()
    # The remedy the message gives: archive the version, push the adapter again.
    drill.registry.archive("corrupt@1")
    drill.registry.push(drill.adapter("corrupt"), "corrupt", base="toy")
    eventually(lambda: drill.chat("corrupt").status_code == 200)


# -- 2. the artifact store goes away ----------------------------------------------------------

@pytest.mark.engine
@pytest.mark.postgres
@pytest.mark.s3
def test_artifact_store_down_resident_adapters_serve_cold_loads_503(drill: Drill):
    drill.s3.stop()
    try:
        assert drill.chat("warm").status_code == 200
        assert drill.chat("corrupt").status_code == 200  # loaded above: resident
        t0 = time.monotonic()
        r = drill.chat("cold")
        took = time.monotonic() - t0
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "5"
        assert _error(r)["code"] == "store_unavailable"
        assert "artifact store s3://" in _error(r)["message"]
        assert took < 30, f"the cold load took {took:.1f} s to fail"
        print(f"observed: cold load with the store down: 503 after {took:.1f} s")
        assert drill.ready()["ready"] is True  # a store outage does not unready the replica
        assert not [e for e in drill.cache_entries() if e.startswith("cold")]
    finally:
        drill.s3.start()
    r = drill.chat("cold")  # the failure was not cached: the next request loads it
    assert r.status_code == 200, r.text


# -- 1. the registry database stops -----------------------------------------------------------

@pytest.mark.engine
@pytest.mark.postgres
@pytest.mark.s3
def test_registry_down_known_refs_serve_unknown_503_then_recovers(drill: Drill):
    objects_before = _objects(drill)
    drill.pg.stop()
    try:
        noticed = eventually(lambda: drill.ready()["registry"] is False, within=5)
        print(f"observed: /ready reported registry=false {noticed:.2f} s after the stop")
        assert drill.ready()["ready"] is True  # still in the load balancer: it serves
        for ref in ("warm", "warm@1", "warm:prod", "cold", "toy"):
            r = drill.chat(ref)
            assert r.status_code == 200, (ref, r.text)
        for ref in ("never-pushed", "warm@7"):
            t0 = time.monotonic()
            r = drill.chat(ref)
            took = time.monotonic() - t0
            assert r.status_code == 503, (ref, r.text)
            assert took < 10
            print(f"observed: {ref!r} with the registry down: 503 in {1000 * took:.0f} ms")
            assert r.headers["retry-after"] == "5"
            err = _error(r)
            assert err["code"] == "store_unavailable" and err["param"] == "model"
            assert "registry" in err["message"]
        ids = {m["id"] for m in httpx.get(drill.url + "/v1/models", headers=H).json()["data"]}
        assert {"warm", "cold", "warm:prod"} <= ids
        # A push (the training job's CLI) fails cleanly and writes nothing.
        late = drill.adapter("late")
        push = subprocess.run(
            [sys.executable, "-m", "loraplex.adapters.cli", "adapters", "push", str(late),
             "--name", "late", "--base", "toy"], env=drill.env, capture_output=True, text=True,
            timeout=120)
        assert push.returncode == 2, push.stderr
        assert "registry database" in push.stderr and "Traceback" not in push.stderr
        assert _objects(drill) == objects_before
    finally:
        drill.pg.start()
    back = eventually(lambda: drill.ready()["registry"] is True, within=10)
    print(f"observed: registry=true {back:.2f} s after the restart")
    r = drill.chat("never-pushed")
    assert r.status_code == 404 and _error(r)["code"] == "model_not_found"
    push = subprocess.run(
        [sys.executable, "-m", "loraplex.adapters.cli", "adapters", "push", str(late),
         "--name", "late", "--base", "toy"], env=drill.env, capture_output=True, text=True,
        timeout=120)
    assert push.returncode == 0, push.stderr
    r = drill.chat("late")  # no server restart
    assert r.status_code == 200, r.text


# -- 4. the engine dies ------------------------------------------------------------------------

def _engine_core(proc: subprocess.Popen):
    import psutil

    cores = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "EngineCore" in p.name() or any("EngineCore" in a for a in p.cmdline()[:1])]
    assert len(cores) == 1, [(p.pid, p.name()) for p in psutil.Process(proc.pid).children(True)]
    return cores[0]


@pytest.mark.engine
@pytest.mark.postgres
@pytest.mark.s3
def test_engine_death_fails_health_and_requests_promptly(drill: Drill):
    assert httpx.get(drill.url + "/health", timeout=5).status_code == 200
    drill.registry.push(drill.adapter("unloaded"), "unloaded", base="toy")  # never loaded
    core = _engine_core(drill.proc)
    lines: list[str] = []
    ended: list[float] = []

    def stream() -> None:
        body = {"model": "warm", "messages": [{"role": "user", "content": "cat dog"}],
                "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
        try:
            with httpx.stream("POST", drill.url + "/v1/chat/completions", json=body,
                              headers=H, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
        except httpx.HTTPError as exc:
            lines.append(f"transport error: {exc!r}")
        ended.append(time.monotonic())

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    eventually(lambda: len(lines) >= 3, within=30)  # mid-stream
    killed_at = time.monotonic()
    core.send_signal(signal.SIGKILL)
    t.join(30)
    assert ended, "the in-flight stream hangs after the engine died"
    assert ended[0] - killed_at < 10
    print(f"observed: stream ended {ended[0] - killed_at:.2f} s after the kill: {lines[-2:]}")
    assert lines[-1] == "data: [DONE]" or lines[-1].startswith("transport error"), lines[-3:]
    events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert "error" in events[-1], f"the stream ended as if complete: {lines[-3:]}"
    finish = [c["choices"][0]["finish_reason"] for c in events if c.get("choices")]
    assert finish[-1] is None, "a cut stream must not claim a normal finish"

    for path in ("/health", "/ready"):
        r = httpx.get(drill.url + path, timeout=10)
        assert r.status_code == 503, (path, r.text)
    for model in ("toy", "warm", "late", "unloaded"):  # base, loaded, loaded, never loaded
        t0 = time.monotonic()
        r = drill.chat(model, timeout=30)
        took = time.monotonic() - t0
        assert r.status_code == 503, (model, r.text)
        assert took < 5
        assert r.headers["retry-after"] == "5" and _error(r)["code"] == "not_ready"
        print(f"observed: {model!r} on the dead engine: 503 in {1000 * took:.0f} ms")
    # and SIGTERM still ends it: nothing hangs on the dead engine
    t0 = time.monotonic()
    stop_server(drill.proc)
    took = time.monotonic() - t0
    print(f"observed: SIGTERM -> exit {drill.proc.returncode} in {took:.1f} s")
    assert drill.proc.returncode is not None and took < 30


# -- 6. the adapter cache disk fills up (fake engine, real registry and disk) -----------------

def test_cache_disk_full_evicts_then_503_then_loads(toy_model_dir, adapter, tmp_path):
    from fastapi.testclient import TestClient

    from loraplex.server.app import create_app
    from loraplex.server.settings import ServerSettings
    from tests.server.test_app_unit import FakeEngine

    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}", str(tmp_path / "art"))
    reg.register_base("toy", toy_model_dir)
    for name in ("first", "second"):
        reg.push(adapter(name), name, base="toy")
    size = reg.resolve("first").total_size
    with tiny_disk(tmp_path / "cache", "4m") as cache:
        settings = ServerSettings(home=tmp_path, model=toy_model_dir, served_model_name="toy",
                                  api_keys=["k"], max_lora_rank=8, adapter_cache_dir=cache,
                                  admin_key="adm")
        stale = cache / "old@1-0123456789abcdef"  # an adapter cached long ago, not in use
        stale.mkdir()
        (stale / "adapter_model.safetensors").write_bytes(b"\0" * (2 * size))
        os.utime(stale, (0, 0))
        filler = fill(cache, leave=size // 2)
        with TestClient(create_app(settings, FakeEngine(), registry=reg)) as c:
            c.headers["Authorization"] = "Bearer k"
            ask = lambda m: c.post("/v1/chat/completions", json={  # noqa: E731
                "model": m, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            r = ask("first")  # evicts the stale entry, retries, loads
            assert r.status_code == 200, r.text
            assert sorted(p.name for p in cache.iterdir()) == [
                "filler", f"first@1-{reg.resolve('first').content_sha256[:16]}"]
            # nothing left to evict: `first` is pinned (a finished request holds nothing)
            r = c.post("/admin/adapters/first/pin", headers={"Authorization": "Bearer adm"})
            assert r.status_code == 200, r.text
            more = fill(cache, name="more")
            r = ask("second")
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "5" and r.json()["error"]["code"] == "not_ready"
            assert "disk" in r.json()["error"]["message"]
            assert sorted(p.name for p in cache.iterdir()) == [
                "filler", f"first@1-{reg.resolve('first').content_sha256[:16]}", "more"]
            more.unlink()
            filler.unlink()
            assert ask("second").status_code == 200
    reg.close()


# -- 1b. the registry database hangs (fake engine, real PostgreSQL) ----------------------------

@pytest.mark.postgres
def test_registry_frozen_unknown_name_is_503_after_the_lookup_timeout(toy_model_dir, adapter,
                                                                        tmp_path):
    from fastapi.testclient import TestClient

    from loraplex.server.app import create_app
    from loraplex.server.lora_manager import LOOKUP_TIMEOUT_S
    from loraplex.server.settings import ServerSettings
    from tests.server.test_app_unit import FakeEngine

    pg = PrivatePostgres()
    try:
        reg = Registry(pg.url, str(tmp_path / "art"))
        reg.register_base("toy", toy_model_dir)
        reg.push(adapter("known"), "known", base="toy")
        settings = ServerSettings(home=tmp_path, model=toy_model_dir, served_model_name="toy",
                                  api_keys=["k"], max_lora_rank=8, poll_interval_s=0.5)
        with TestClient(create_app(settings, FakeEngine(), registry=reg)) as c:
            c.headers["Authorization"] = "Bearer k"
            ask = lambda m: c.post("/v1/chat/completions", json={  # noqa: E731
                "model": m, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert ask("known").status_code == 200
            pg.freeze()
            try:
                time.sleep(1)  # the poller is now stuck on the frozen server
                t0 = time.monotonic()
                assert ask("known").status_code == 200  # from the snapshot, at once
                assert time.monotonic() - t0 < 2
                r = ask("unknown")
                took = time.monotonic() - t0
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "store_unavailable"
                assert r.headers["retry-after"] == "5"
                print(f"observed: unknown name with the registry frozen: 503 after {took:.1f} s")
                assert LOOKUP_TIMEOUT_S - 1 < took < LOOKUP_TIMEOUT_S + 5, took
                assert c.get("/ready").status_code == 200
            finally:
                pg.thaw()
            reg.push(adapter("fresh"), "fresh", base="toy")
            eventually(lambda: ask("fresh").status_code == 200, within=15)
            assert ask("unknown").status_code == 404
        reg.close()
    finally:
        pg.close()
