"""Rendering the Helm chart offline for the deploy tests.

`helm-python-sdk` binds Helm's own Go SDK (a shared library in the wheel): real Helm template
rendering and values-schema validation, no helm binary, no cluster, no network.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import yaml

from tests.deploy.k8s import CHART, NAMESPACE, RELEASE


@pytest.fixture(scope="session")
def chart():
    helm = pytest.importorskip("helm_python", reason="pip install helm-python-sdk")
    with helm.Chart.load(CHART) as c:
        yield c


@pytest.fixture(scope="session")
def render(chart) -> Callable[[dict], list[dict]]:
    """values -> the rendered Kubernetes objects (schema-checked first, as `helm install` does)."""
    def render(values: dict) -> list[dict]:
        chart.validate_schema(values)
        out = chart.render(values, name=RELEASE, namespace=NAMESPACE)
        objs = []
        for name, text in sorted(out.items()):
            if not name.endswith(".yaml"):  # NOTES.txt
                continue
            objs += [d for d in yaml.safe_load_all(text) if d]
        return objs
    return render
