"""Helpers for the chart tests: where the chart is, its value scenarios, object lookups.

Scenarios: the default values, and each file in the chart's ci/ folder (one optional feature
or variant each: the chart-testing convention).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "loraplex"
SCENARIOS = {"default": {}} | {
    p.name.removesuffix("-values.yaml"): yaml.safe_load(p.read_text())
    for p in sorted((CHART / "ci").glob("*-values.yaml"))
}
RELEASE, NAMESPACE = "lp", "inference"


def find(objs: list[dict], kind: str, component: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and (
        component is None
        or o["metadata"]["labels"].get("app.kubernetes.io/component") == component)]


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def containers(obj: dict) -> list[dict]:
    spec = pod_spec(obj)
    return spec.get("initContainers", []) + spec["containers"]


# -- monitoring files --------------------------------------------------------------------------

MONITORING = CHART.parents[1] / "monitoring"
_METRIC = re.compile(r"\b(loraplex_[a-z_]+|vllm:[a-z_:]+|up)(?=\s*[{\[)])")


def dashboard_exprs() -> list[str]:
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def referenced_metrics() -> set[str]:
    """Series names the dashboard and the alerts query (as exposed: `_total`, `_bucket`...)."""
    return {m for e in dashboard_exprs() + alert_exprs() for m in _METRIC.findall(e)}
