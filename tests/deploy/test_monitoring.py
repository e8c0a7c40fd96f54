"""The Grafana dashboard and the Prometheus alert rules.

`promtool` (Debian package `prometheus`, installed by .ci/setup) checks the rules and runs
their unit tests; the dashboard's queries are checked by promtool too (as recording rules),
and every series either file names must be one the server exports: our loraplex_* series from
the Metrics class, vLLM's from the source of the installed vLLM (the live check against a
running server is in test_multi_replica.py).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.k8s import MONITORING, dashboard_exprs, referenced_metrics

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None,
                                    reason="promtool not found (apt-get install prometheus)")


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_alert_rules_are_valid_and_their_unit_tests_pass():
    p = promtool("check", "rules", "alerts.yaml")
    assert p.returncode == 0, p.stdout + p.stderr
    p = promtool("test", "rules", "alerts_test.yaml")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS" in p.stdout


@needs_promtool
def test_promtool_unit_tests_can_fail(tmp_path):
    """A wrong expectation makes `promtool test rules` fail (the suite above is not vacuous)."""
    tests = yaml.safe_load((MONITORING / "alerts_test.yaml").read_text())
    shutil.copy(MONITORING / "alerts.yaml", tmp_path)
    case = tests["tests"][0]["alert_rule_test"][1]
    case["exp_alerts"][0]["exp_labels"]["pod"] = "some-other-pod"
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(tests))
    p = promtool("test", "rules", "t.yaml", cwd=tmp_path)
    assert p.returncode != 0 and "FAILED" in p.stdout + p.stderr


def test_every_alert_is_tested_firing_and_quiet():
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load((MONITORING / "alerts_test.yaml").read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    firing = {c["alertname"] for c in cases if c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert alerts == firing, f"alerts never shown firing: {alerts - firing}"
    assert alerts == quiet, f"alerts never shown quiet: {alerts - quiet}"
    for g in rules["groups"]:
        for r in g["rules"]:
            assert r["labels"]["severity"] in {"critical", "warning", "info"}, r["alert"]
            assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


def test_dashboard_covers_the_promised_views():
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    assert dash["uid"] and dash["title"] == "loraplex"
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "namespace", "service", "adapter"} <= names
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    # panels do not overlap on the 24-column grid
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, p["title"]
        cells |= mine
    for p in panels:
        if p["type"] != "row":
            assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
    used = referenced_metrics()
    promised = {  # per-adapter traffic, TTFT, latency, load times, residency, queue, KV cache
        "loraplex_requests_total", "loraplex_time_to_first_token_seconds_bucket",
        "loraplex_request_duration_seconds_bucket", "loraplex_adapter_load_seconds_bucket",
        "loraplex_adapter_resident", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    }
    assert promised <= used, promised - used
    exprs = " ".join(dashboard_exprs())
    assert "by (adapter)" in exprs and 'adapter=~"$adapter"' in exprs


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path):
    # Grafana's variables, as Grafana would substitute them; then promtool parses each query.
    subst = {"$__rate_interval": "5m", "$namespace": "ai", "$service": "lp-loraplex",
             "$adapter": ".*"}
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        for k, v in subst.items():
            expr = expr.replace(k, v)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": rules}]}))
    p = promtool("check", "rules", "d.yaml", cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr


def exported_names() -> set[str]:
    """Sample names the server can expose: ours from Metrics, vLLM's from its source."""
    from loraplex.server.metrics import Metrics

    names = {"up"}
    for fam in Metrics().registry.collect():
        kind = fam.type
        names |= {fam.name} | ({f"{fam.name}_total"} if kind == "counter" else set()) | (
            {f"{fam.name}_{s}" for s in ("bucket", "sum", "count")} if kind == "histogram" else set())
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        pytest.skip("vllm is not installed")
    source = (Path(spec.origin).parent / "v1" / "metrics" / "loggers.py").read_text()
    for base in re.findall(r'name="(vllm:[a-z_]+)"', source):
        names |= {base, f"{base}_total", f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    return names


def test_every_queried_series_is_exported():
    missing = referenced_metrics() - exported_names()
    assert not missing, f"the dashboard/alerts query series nobody exports: {sorted(missing)}"
