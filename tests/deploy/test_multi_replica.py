"""Two `loraplex serve` replicas on one real PostgreSQL registry and one real S3 store.

This is the cluster's contract, on loopback: what a Deployment with `replicas: 2` relies on.
- a version pushed by a training Job, and an alias move (promotion, rollback), reach both
  replicas within 5 s, through the registry alone (no call to either replica);
- a replica killed outright (SIGKILL: OOM, node loss) leaves the other serving;
- SIGTERM (what the kubelet sends after the preStop sleep) refuses new work but lets an
  in-flight stream run to its end, then the process exits 0.

Both engines start once for the module (tens of seconds of CPU each); the tests run in file
order and the last two consume the replicas.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from loraplex.adapters.registry import Registry
from tests.deploy.k8s import referenced_metrics
from tests.services import (
    create_bucket,
    create_database,
    free_port,
    server_env,
    spawn_server,
    wait_ready,
)

pytestmark = [pytest.mark.engine, pytest.mark.postgres, pytest.mark.s3]

H = {"Authorization": "Bearer test-key"}
SPREAD_S = 5.0  # the promise: a registry change is served by every replica within this


@dataclass
class Replica:
    name: str
    url: str
    proc: subprocess.Popen
    log: Path

    def chat(self, model: str, **kw) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "cat dog"}],
                "max_tokens": 4, "temperature": 0, **kw}
        return httpx.post(self.url + "/v1/chat/completions", json=body, headers=H, timeout=60)

    def resolves(self, model: str) -> str | None:
        """The version ref this replica serves for `model` now (None while it cannot)."""
        r = httpx.post(self.url + "/v1/render", headers=H, timeout=10,
                       json={"model": model, "messages": [{"role": "user", "content": "x"}]})
        return r.json()["adapter"] if r.status_code == 200 else None


def replica_env(home: Path, port: int, registry_url: str, artifacts_url: str, s3: dict
                ) -> dict[str, str]:
    """The env a Pod of the chart gets (same names), pointed at loopback services."""
    return server_env(
        home, port, LORAPLEX_MAX_CPU_LORAS="4", LORAPLEX_MAX_NUM_SEQS="8",
        LORAPLEX_POLL_INTERVAL_S="0.5", LORAPLEX_DRAIN_TIMEOUT_S="60",
        LORAPLEX_REGISTRY_URL=registry_url, LORAPLEX_ARTIFACTS_URL=artifacts_url,
        LORAPLEX_S3_ENDPOINT_URL=s3["endpoint_url"], LORAPLEX_S3_KEY=s3["key"],
        LORAPLEX_S3_SECRET=s3["secret"],
    )


def eventually(check: Callable[[], bool], within: float = SPREAD_S) -> float:
    """Seconds until `check()` held; fails past `within`."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < within, f"not true within {within} s"
        time.sleep(0.1)
    return time.monotonic() - t0


@dataclass
class Cluster:
    registry: Registry
    a: Replica
    b: Replica
    adapters: list[Path]


@pytest.fixture(scope="module")
def cluster(toy_model_dir, lora_trainer, pg_server, s3_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    registry_url, artifacts_url = create_database(pg_server), create_bucket(s3_server)
    registry = Registry(registry_url, artifacts_url, storage_options=s3_server)
    registry.register_base("toy", toy_model_dir)
    # One-step tunes: valid adapters in seconds; different seeds give different contents,
    # so each push is a new version (outputs do not matter here, which version serves does).
    adapters = [lora_trainer(toy_model_dir, root / f"a{i}", "upper", rank=8, steps=1, seed=i)
                for i in range(3)]
    replicas = []
    for name in ("a", "b"):  # start both, then wait: the engines load side by side
        port, home = free_port(), root / name
        home.mkdir()
        log = root / f"{name}.log"
        proc = spawn_server(toy_model_dir,
                            replica_env(home, port, registry_url, artifacts_url, s3_server), log)
        replicas.append(Replica(name, f"http://127.0.0.1:{port}", proc, log))
    try:
        for r in replicas:
            wait_ready(r.proc, r.url, r.log)
        yield Cluster(registry, replicas[0], replicas[1], adapters)
    finally:
        for r in replicas:
            if r.proc.poll() is None:
                os.killpg(r.proc.pid, signal.SIGKILL)
                r.proc.wait()
        registry.close()


def test_pushed_version_and_alias_moves_reach_both_replicas(cluster):
    reg, both = cluster.registry, (cluster.a, cluster.b)
    # A training Job registers v1 and points `prod` at it.
    reg.push(cluster.adapters[0], "rollout", alias="prod", base="toy")
    eventually(lambda: all(r.resolves("rollout:prod") == "rollout@1" for r in both))
    for r in both:
        assert r.chat("rollout:prod").status_code == 200, r.name

    # v2 lands without moving `prod` (a canary): prod still serves v1 everywhere.
    reg.push(cluster.adapters[1], "rollout", alias="canary", base="toy")
    eventually(lambda: all(r.resolves("rollout:canary") == "rollout@2" for r in both))
    assert all(r.resolves("rollout:prod") == "rollout@1" for r in both)

    # Promotion is an alias move; rollback is moving it back. Each reaches both in time.
    for target in ("2", "1"):
        reg.set_alias("rollout", "prod", target)
        eventually(lambda t=target: all(r.resolves("rollout:prod") == f"rollout@{t}"
                                        for r in both))
        for r in both:
            resp = r.chat("rollout:prod")
            assert resp.status_code == 200, (r.name, resp.text)


def test_replicas_export_every_series_the_dashboard_and_alerts_use(cluster):
    from prometheus_client.parser import text_string_to_metric_families

    for r in (cluster.a, cluster.b):
        text = httpx.get(r.url + "/metrics", timeout=10).text
        samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
        missing = referenced_metrics() - {"up"} - {s.name for s in samples}  # `up`: Prometheus'
        assert not missing, f"{r.name} does not expose {sorted(missing)}"
        # per-adapter series carry the adapter and version of the traffic above
        served = {(s.labels["adapter"], s.labels["version"]) for s in samples
                  if s.name == "loraplex_requests_total" and s.value > 0}
        assert {("rollout", "1"), ("rollout", "2")} <= served, (r.name, served)


def test_sigkill_of_one_replica_leaves_the_other_serving(cluster):
    a, b = cluster.a, cluster.b
    os.killpg(b.proc.pid, signal.SIGKILL)
    assert b.proc.wait(30) == -signal.SIGKILL
    with pytest.raises(httpx.ConnectError):
        httpx.get(b.url + "/health", timeout=2)
    # The survivor serves the base and adapters, and still follows the shared registry.
    assert httpx.get(a.url + "/ready", timeout=5).status_code == 200
    assert a.chat("toy").status_code == 200
    assert a.chat("rollout:prod").status_code == 200
    cluster.registry.push(cluster.adapters[2], "rollout", alias="prod", base="toy")
    eventually(lambda: a.resolves("rollout:prod") == "rollout@3")
    assert a.chat("rollout:prod").status_code == 200


def test_sigterm_drains_the_in_flight_stream_then_exits_0(cluster):
    a = cluster.a
    body = {"model": "rollout:prod", "messages": [{"role": "user", "content": "cat dog"}],
            "max_tokens": 200, "ignore_eos": True, "temperature": 0, "stream": True}
    refused: list[str] = []  # what a new request saw while the stream was draining

    def probe_new_work() -> None:
        # A new connection after SIGTERM: the port is closed or /ready says 503.
        while a.proc.poll() is None:
            try:
                code = httpx.get(a.url + "/ready", timeout=1).status_code
                if code == 503:
                    refused.append("503")
                    return
            except httpx.TransportError as exc:
                refused.append(type(exc).__name__)
                return
            time.sleep(0.05)

    lines, tokens_at_refusal = [], None
    prober = threading.Thread(target=probe_new_work, daemon=True)
    with httpx.stream("POST", a.url + "/v1/chat/completions", json=body, headers=H,
                      timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line:
                continue
            lines.append(line)
            if len(lines) == 3:  # mid-stream: what the kubelet does after preStop
                a.proc.send_signal(signal.SIGTERM)
                prober.start()
            if tokens_at_refusal is None and refused:
                tokens_at_refusal = len(lines)
    prober.join(10)
    assert lines[-1] == "data: [DONE]", lines[-3:]
    chunks = [json.loads(x[6:]) for x in lines[:-1]]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == "length", f"the stream was cut: {lines[-3:]}"
    assert refused, "new work was still accepted after SIGTERM"
    # The refusal happened while the stream was still going: draining, not finishing first.
    assert tokens_at_refusal is not None and tokens_at_refusal < len(lines) - 1, (
        f"refused only after the stream ended (line {tokens_at_refusal} of {len(lines)})")
    assert a.proc.wait(60) == 0, a.log.read_text()[-3000:]
