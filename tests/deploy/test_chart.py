"""The Helm chart, rendered offline by Helm's own engine, checked against Kubernetes' schemas,
the pod invariants we promise, and the server's settings object.

Every scenario (default values and each ci/*-values.yaml) is rendered; every object is validated
strictly (unknown fields rejected) for Kubernetes 1.29 and 1.33 with `kubernetes-validate`.
The settings tests import ServerSettings: a new server field fails them until the chart can set
it, and a chart env var that is not a field fails them too.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import types
import typing
from contextlib import redirect_stdout

import jsonschema
import pytest
import yaml

from loraplex.adapters.settings import RegistrySettings
from loraplex.server.settings import ServerSettings
from tests.deploy.k8s import CHART, NAMESPACE, RELEASE, SCENARIOS, containers, find, pod_spec

kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
helm = pytest.importorskip("helm_python", reason="pip install helm-python-sdk")

KUBE_VERSIONS = ["1.29.0", "1.33.0"]
FULLNAME = f"{RELEASE}-loraplex"
# ServerSettings fields the chart takes from Secrets only (never into a ConfigMap).
SECRET_ONLY = {"s3_secret", "api_keys", "admin_key", "keys_inline"}
FIELDS = set(ServerSettings.model_fields)
REGISTRY_FIELDS = set(RegistrySettings.model_fields)

# The custom resources the chart can render have no schema in kubernetes-validate; these are
# the parts of their CRDs the chart uses, strict like the built-in ones.
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_HOSTNAME = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_LABEL_KEY = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
              r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
_DURATION = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"  # a Gateway API duration (GEP-2257)
_PORT = {"type": "object", "required": ["number"], "additionalProperties": False,
         "properties": {"number": {"type": "integer", "minimum": 1, "maximum": 65535}}}
_META = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string"}, "labels": {"type": "object"}}, "additionalProperties": False}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {"apiVersion": {}, "kind": {}, "metadata": _META, "spec": {
            "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"]},
                "namespaceSelector": {"type": "object", "properties": {
                    "matchNames": {"type": "array", "items": {"type": "string"}}},
                    "additionalProperties": False},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["port"], "additionalProperties": False,
                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                   "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                   "scrapeTimeout": {"type": "string",
                                                     "pattern": "^[0-9]+(ms|s|m|h)$"}}}}}}}},
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {"apiVersion": {}, "kind": {}, "metadata": _META, "spec": {
            "type": "object", "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"],
                                   "additionalProperties": False, "properties": {
                                       "apiVersion": {"type": "string"},
                                       "kind": {"type": "string"}, "name": {"type": "string"}}},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer"}, "cooldownPeriod": {"type": "integer"},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"],
                    "additionalProperties": False, "properties": {
                        "type": {"const": "prometheus"},
                        "metadata": {"type": "object",
                                     "required": ["serverAddress", "query", "threshold"],
                                     "additionalProperties": {"type": "string"}}}}}}}}},
    # Kubeflow's training operator v1 (kubeflow.org/v1 PyTorchJob): the replica specs; each
    # replica's pod template is validated as a Pod by kubernetes-validate besides.
    ("kubeflow.org/v1", "PyTorchJob"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {"apiVersion": {}, "kind": {}, "metadata": _META, "spec": {
            "type": "object", "required": ["pytorchReplicaSpecs"], "additionalProperties": False,
            "properties": {
                "nprocPerNode": {"type": "string", "pattern": "^([1-9][0-9]*|auto|cpu|gpu)$"},
                "runPolicy": {"type": "object", "additionalProperties": False, "properties": {
                    "backoffLimit": {"type": "integer", "minimum": 0},
                    "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                    "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                    "cleanPodPolicy": {"enum": ["All", "Running", "None"]}}},
                "pytorchReplicaSpecs": {
                    "type": "object", "required": ["Master"], "additionalProperties": False,
                    "patternProperties": {"^(Master|Worker)$": {
                        "type": "object", "required": ["replicas", "template"],
                        "additionalProperties": False, "properties": {
                            "replicas": {"type": "integer", "minimum": 1},
                            "restartPolicy": {"enum": ["Always", "OnFailure", "Never",
                                                       "ExitCode"]},
                            "template": {"type": "object", "required": ["spec"]}}}}}}}}},
    # Gateway API Inference Extension, GA API (inference.networking.k8s.io/v1, from v1.0.0):
    # the spec of api/v1/inferencepool_types.go. Stricter than the CRD where versions differ:
    # one target port (v1.0's maxItems; later releases allow 8), endpointPickerRef required
    # (optional only since v1.5, still required by most gateways) and its `port` required
    # (the CRD's rule for kind Service, the default). v1alpha2's targetPortNumber/extensionRef
    # and the pre-GA portNumber are rejected.
    ("inference.networking.k8s.io/v1", "InferencePool"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {"apiVersion": {}, "kind": {}, "metadata": _META, "spec": {
            "type": "object", "required": ["selector", "targetPorts", "endpointPickerRef"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object", "required": ["matchLabels"], "additionalProperties": False,
                    "properties": {"matchLabels": {
                        "type": "object", "minProperties": 1, "maxProperties": 64,
                        "propertyNames": {"pattern": _LABEL_KEY},
                        "additionalProperties": {"type": "string", "maxLength": 63,
                                                 "pattern": _LABEL_VALUE}}}},
                "targetPorts": {"type": "array", "minItems": 1, "maxItems": 1, "items": _PORT},
                "endpointPickerRef": {
                    "type": "object", "required": ["name", "port"], "additionalProperties": False,
                    "properties": {
                        "group": {"type": "string", "maxLength": 253},
                        "kind": {"type": "string", "minLength": 1, "maxLength": 63},
                        "name": {"type": "string", "minLength": 1, "maxLength": 253},
                        "port": _PORT,
                        "failureMode": {"enum": ["FailOpen", "FailClose"]}}}}}}},
    # Gateway API standard channel (gateway.networking.k8s.io/v1 HTTPRoute, `timeouts` since
    # v1.2): the fields the chart sets, with the CRD's limits and patterns.
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {"apiVersion": {}, "kind": {}, "metadata": _META, "spec": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "parentRefs": {"type": "array", "minItems": 1, "maxItems": 32, "items": {
                    "type": "object", "required": ["name"], "additionalProperties": False,
                    "properties": {
                        "group": {"type": "string"}, "kind": {"type": "string"},
                        "name": {"type": "string", "minLength": 1, "maxLength": 253},
                        "namespace": {"type": "string", "pattern": _DNS_LABEL},
                        "sectionName": {"type": "string", "pattern": _DNS_SUBDOMAIN},
                        "port": {"type": "integer", "minimum": 1, "maximum": 65535}}}},
                "hostnames": {"type": "array", "maxItems": 16, "items": {
                    "type": "string", "maxLength": 253, "pattern": _HOSTNAME}},
                "rules": {"type": "array", "minItems": 1, "maxItems": 16, "items": {
                    "type": "object", "additionalProperties": False, "properties": {
                        "matches": {"type": "array", "maxItems": 64, "items": {
                            "type": "object", "additionalProperties": False, "properties": {
                                "path": {"type": "object", "additionalProperties": False,
                                         "properties": {
                                             "type": {"enum": ["Exact", "PathPrefix",
                                                               "RegularExpression"]},
                                             "value": {"type": "string", "maxLength": 1024,
                                                       "pattern": "^/"}}}}}},
                        "backendRefs": {"type": "array", "maxItems": 16, "items": {
                            "type": "object", "required": ["name"], "additionalProperties": False,
                            "properties": {
                                "group": {"type": "string"}, "kind": {"type": "string"},
                                "name": {"type": "string", "minLength": 1, "maxLength": 253},
                                "namespace": {"type": "string", "pattern": _DNS_LABEL},
                                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                                "weight": {"type": "integer", "minimum": 0,
                                           "maximum": 1000000}}}},
                        "timeouts": {"type": "object", "additionalProperties": False,
                                     "properties": {
                                         "request": {"type": "string", "pattern": _DURATION},
                                         "backendRequest": {"type": "string",
                                                            "pattern": _DURATION}}}}}}}}}},
}


def replica_pods(job: dict) -> dict[str, dict]:
    """A PyTorchJob's replica pod templates as Pods (what the operator creates)."""
    return {role: {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": f"{job['metadata']['name']}-{role.lower()}-0",
                                **r["template"].get("metadata", {})},
                   "spec": r["template"]["spec"]}
            for role, r in job["spec"]["pytorchReplicaSpecs"].items()}


@pytest.fixture(scope="module")
def rendered(render) -> dict[str, list[dict]]:
    return {name: render(values) for name, values in SCENARIOS.items()}


def server(objs: list[dict]) -> dict:
    (dep,) = find(objs, "Deployment", "server")
    return dep


def server_container(objs: list[dict]) -> dict:
    return next(c for c in pod_spec(server(objs))["containers"] if c["name"] == "server")


def workloads(objs: list[dict]) -> list[dict]:
    """Everything with a pod template (`spec.template`): a PyTorchJob's replicas each count."""
    return find(objs, "Deployment") + find(objs, "Job") + [
        {"kind": "PyTorchJob", "metadata": j["metadata"], "spec": r}
        for j in find(objs, "PyTorchJob") for r in j["spec"]["pytorchReplicaSpecs"].values()]


def overlay(base: dict, top: dict) -> dict:
    """`top` merged over a copy of `base`, maps key by key (how Helm merges values)."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = overlay(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def merged(values: dict) -> dict:
    """The chart defaults with `values` on top (what Helm computes)."""
    return overlay(yaml.safe_load((CHART / "values.yaml").read_text()), values)


def effective_env(objs: list[dict], container: dict, secrets: dict | None = None
                  ) -> dict[str, str]:
    """A container's env as the kubelet builds it: envFrom ConfigMaps, then env entries (which
    win); secretKeyRefs resolved from `secrets[(name, key)]` (a missing one must be optional),
    or left out when `secrets` is None."""
    maps = {o["metadata"]["name"]: o.get("data", {}) for o in find(objs, "ConfigMap")}
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        env.update(maps[src["configMapRef"]["name"]])
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            if secrets is None:
                continue
            if (ref["name"], ref["key"]) in secrets:
                env[e["name"]] = secrets[(ref["name"], ref["key"])]
            else:
                assert ref.get("optional"), f"{e['name']}: Secret {ref['name']}/{ref['key']} missing"
    return env


# -- rendering and Kubernetes validity --------------------------------------------------------

@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_is_clean(scenario):
    for version in KUBE_VERSIONS:
        report = helm.lint(str(CHART), SCENARIOS[scenario], strict=True,
                           kube_version=f"v{version}")
        assert not report["errors"], report
        assert not [m for m in report["messages"] if m["severity"] >= 2], report["messages"]


EXPECTED = {  # scenario -> (kinds it must add to the default set, component that must appear)
    "default": ({"Deployment", "Service", "ConfigMap", "ServiceAccount", "PodDisruptionBudget",
                 "Job"}, "migrations"),
    "cpu": (set(), "server"),
    "download": (set(), "server"),
    "hpa": ({"HorizontalPodAutoscaler"}, "server"),
    "keda": ({"ScaledObject", "ServiceMonitor"}, "server"),
    "observability": ({"ServiceMonitor", "NetworkPolicy"}, "server"),
    "trainer": ({"Job"}, "trainer"),
    "trainer-multinode": ({"PyTorchJob"}, "trainer"),
    "gpu-8b": (set(), "server"),  # deploy/README.md's one-GPU example
    "gpu-70b-tp4": (set(), "server"),  # and its tensor-parallel example
    "inferencepool": ({"InferencePool", "HTTPRoute"}, "server"),  # deploy/README.md section 9
}
OPTIONAL_KINDS = {"HorizontalPodAutoscaler", "ScaledObject", "ServiceMonitor", "NetworkPolicy",
                  "PyTorchJob", "InferencePool", "HTTPRoute"}


def test_each_scenario_turns_its_feature_on(rendered):
    assert set(EXPECTED) == set(SCENARIOS), "a ci/*-values.yaml file without expectations"
    default_kinds = {o["kind"] for o in rendered["default"]}
    assert default_kinds == EXPECTED["default"][0]
    for name, (kinds, component) in EXPECTED.items():
        objs = rendered[name]
        got = {o["kind"] for o in objs}
        assert kinds <= got, (name, got)
        assert got & OPTIONAL_KINDS == kinds & OPTIONAL_KINDS, (name, got)
        assert any(o["metadata"]["labels"].get("app.kubernetes.io/component") == component
                   for o in objs), name
    # the variants change what they claim to
    names = lambda objs: [c["name"] for c in containers(server(objs))]  # noqa: E731
    assert "download-model" in names(rendered["download"])
    assert "download-model" not in names(rendered["default"])
    assert "@sha256:" in server_container(rendered["download"])["image"]
    assert not find(rendered["trainer"], "Job", "migrations")  # initContainer mode: no hook
    assert find(rendered["default"], "Job", "migrations")
    assert "replicas" not in server(rendered["hpa"])["spec"]  # the autoscaler owns it
    assert server(rendered["default"])["spec"]["replicas"] == 2


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_object_is_valid_kubernetes(rendered, scenario, version):
    for obj in rendered[scenario]:
        crd = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        if crd is not None:
            jsonschema.validate(obj, crd)
            if obj["kind"] == "PyTorchJob":
                for pod in replica_pods(obj).values():
                    kv.validate(pod, version, strict=True)
        else:
            kv.validate(obj, version, strict=True)  # raises on any unknown or wrong field


def test_kubernetes_validate_cli_accepts_the_default_release(rendered, tmp_path):
    """The same check through the `kubernetes-validate --strict` command, as a user runs it."""
    import subprocess
    import sys

    manifest = tmp_path / "release.yaml"
    manifest.write_text(yaml.safe_dump_all(rendered["default"]))
    cli = os.path.join(os.path.dirname(sys.executable), "kubernetes-validate")
    for version in KUBE_VERSIONS:
        p = subprocess.run([cli, "--strict", "--quiet", "-k", version, str(manifest)],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
    bad = copy.deepcopy(rendered["default"])
    find(bad, "Service")[0]["spec"]["prots"] = []
    manifest.write_text(yaml.safe_dump_all(bad))
    p = subprocess.run([cli, "--strict", "-k", "1.29.0", str(manifest)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0 and "prots" in p.stdout + p.stderr


def test_validation_would_catch_a_bad_object(rendered):
    """The validators above are not vacuous: a stray field and a wrong type are rejected."""
    dep = copy.deepcopy(server(rendered["default"]))
    pod_spec(dep)["containers"][0]["startupprobe"] = {}  # a typo of startupProbe
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, "1.29.0", strict=True)
    dep = copy.deepcopy(server(rendered["default"]))
    dep["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, "1.33.0", strict=True)
    (sm,) = find(rendered["keda"], "ServiceMonitor")
    sm = copy.deepcopy(sm)
    sm["spec"]["endpoints"][0]["targetport"] = 8000
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(sm, CRD_SCHEMAS[("monitoring.coreos.com/v1", "ServiceMonitor")])


def test_guards_reject_bad_values(render):
    for bad, says in [
        ({"autoscaling": {"hpa": {"enabled": True}, "keda": {"enabled": True}}}, "at most one"),
        ({"model": {"source": "download"}}, "model.download.url"),
        ({"trainer": {"enabled": True, "register": "x"}}, "runName"),
        ({"trainer": {"enabled": True, "runName": "r1"}}, "trainer.register"),
    ]:
        with pytest.raises(helm.HelmError, match=says):
            render(bad)
    for bad in [
        {"image": {"tag": "latest"}},
        {"settings": {"api_keys": "key-in-a-configmap"}},  # secrets only via secretEnv
        {"settings": {"max_lora": 4}},  # a typo of a field
        {"secretEnv": {"registry": {"secret": "s", "key": "k"}}},  # not a field
        {"extraEnv": [{"name": "LORAPLEX_PORT", "value": "1"}]},  # settings go in `settings`
        {"podSecurityContext": {"runAsNonRoot": False}},
        {"migrations": {"mode": "sometimes"}},
    ]:
        with pytest.raises(helm.HelmError):
            render(bad)
    assert render({"global": {"imageRegistry": "mirror"}})  # as a subchart, Helm adds `global`


# -- pod invariants ---------------------------------------------------------------------------

@pytest.mark.parametrize("scenario", SCENARIOS)
def test_server_pod_probes_draining_shm_and_accelerators(rendered, scenario):
    objs, values = rendered[scenario], merged(SCENARIOS[scenario])
    spec, c = pod_spec(server(objs)), server_container(objs)
    env = effective_env(objs, c, secrets=None)
    port = int(env["LORAPLEX_PORT"])
    assert [p["containerPort"] for p in c["ports"] if p["name"] == "http"] == [port]
    (svc,) = find(objs, "Service")
    assert svc["spec"]["ports"][0]["targetPort"] == "http"

    startup, live, ready = c["startupProbe"], c["livenessProbe"], c["readinessProbe"]
    assert startup["httpGet"] == {"path": "/health", "port": "http"}
    assert live["httpGet"] == {"path": "/health", "port": "http"}
    assert ready["httpGet"] == {"path": "/ready", "port": "http"}
    # sized for a model load: minutes, not the default 30 s
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600

    # drain: preStop keeps serving while endpoints update; the grace covers it plus the drain
    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and int(sleep[1]) >= 5
    drain = float(env["LORAPLEX_DRAIN_TIMEOUT_S"])
    assert spec["terminationGracePeriodSeconds"] >= int(sleep[1]) + math.ceil(drain) + 5

    vols = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert mounts[env["LORAPLEX_MODEL"]] == "model"
    assert "emptyDir" in vols[mounts[env["LORAPLEX_HOME"]]]  # writable state, not the image

    limits = c["resources"]["limits"]
    if values["gpu"]["enabled"]:
        assert limits[values["gpu"]["resourceName"]] == gpus_needed(values)
        assert "nvidia.com/gpu" not in c["resources"].get("requests", {}) or (
            c["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"])
    else:
        assert not [k for k in limits if "gpu" in k]


def gpus_needed(values: dict) -> int:
    """GPUs the engine of these values uses: TP x PP x data_parallel_size (or gpu.count)."""
    s = values["settings"]
    need = (s.get("tensor_parallel_size") or 1) * (s.get("pipeline_parallel_size") or 1) * (
        (s.get("engine_args") or {}).get("data_parallel_size") or 1)
    return values["gpu"].get("count") or need


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_container_is_non_root_pinned_and_has_resources(rendered, scenario):
    for w in workloads(rendered[scenario]):
        spec = pod_spec(w)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] > 0
        assert spec["automountServiceAccountToken"] is False
        for c in containers(w):
            where = f"{w['metadata']['name']}/{c['name']}"
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert "ALL" in sc["capabilities"]["drop"], where
            image = c["image"]
            assert "@sha256:" in image or ":" in image.rsplit("/", 1)[-1], f"{where}: {image}"
            assert not image.endswith(":latest"), where
            r = c["resources"]
            assert r["requests"]["cpu"] and r["requests"]["memory"], where
            assert r["limits"]["memory"], where


# -- settings: chart <-> ServerSettings -------------------------------------------------------

def test_values_and_schema_cover_exactly_the_server_settings():
    props = json.loads((CHART / "values.schema.json").read_text())["properties"]
    assert set(props["settings"]["properties"]) == FIELDS - SECRET_ONLY
    assert set(props["secretEnv"]["propertyNames"]["enum"]) == FIELDS
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values["settings"]) == FIELDS - SECRET_ONLY  # each one documented in values.yaml
    assert set(values["secretEnv"]) <= FIELDS
    assert SECRET_ONLY <= set(values["secretEnv"])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_chart_env_var_is_a_server_setting(rendered, scenario):
    objs = rendered[scenario]
    (cm,) = find(objs, "ConfigMap")
    names = set(cm["data"])
    for w in workloads(objs):
        for c in containers(w):
            own = {e["name"] for e in c.get("env", []) if e["name"].startswith("LORAPLEX_")}
            names |= own
            if c["name"] != "server":  # jobs and init containers only open the registry
                assert {n.removeprefix("LORAPLEX_").lower() for n in own} <= REGISTRY_FIELDS, (
                    c["name"], own)
            for src in c.get("envFrom", []):
                assert src == {"configMapRef": {"name": FULLNAME}}
    assert all(n.startswith("LORAPLEX_") for n in cm["data"])
    unknown = {n for n in names if n.removeprefix("LORAPLEX_").lower() not in FIELDS}
    assert not unknown, f"env vars that are no ServerSettings field: {sorted(unknown)}"
    assert "LORAPLEX_REGISTRY_URL" in names and "LORAPLEX_ARTIFACTS_URL" in names


# One non-default value per ServerSettings field, typed as a user writes it in values.yaml.
SET_ALL = {
    "home": "/srv/lp", "registry_url": "postgresql://u:p@pg:5432/lp",
    "artifacts_url": "s3://bucket/prefix", "s3_endpoint_url": "http://minio:9000",
    "s3_key": "AKIA1", "s3_secret": "from-secret", "max_adapter_rank": 32,
    "max_adapter_bytes": 5 << 30, "model": "/models/m", "served_model_name": "llama",
    "base_name": "llama-31", "tool_format": "llama3_json", "host": "0.0.0.0", "port": 8081,
    "api_keys": "k1,k2", "admin_key": "adm", "max_model_len": 8192, "max_loras": 8,
    "max_lora_rank": 32, "max_cpu_loras": 24, "max_num_seqs": 128, "dtype": "bfloat16",
    "gpu_memory_utilization": 0.85, "cpu_kvcache_space_gib": 12, "enforce_eager": True,
    "seed": 7, "poll_interval_s": 0.5, "adapter_cache_dir": "/srv/lp/adapters",
    "adapter_cache_bytes": 3 << 40, "preload": ["bot:prod", "sql@3"], "lora_prefetch": False,
    "lora_slot_gate": True, "lora_slot_deadline_s": 1.5, "auto_pin": 8, "auto_pin_window": 500,
    "max_queue": 512,
    "drain_timeout_s": 45.5, "tensor_parallel_size": 2, "pipeline_parallel_size": 2,
    "quantization": "fp8", "kv_cache_dtype": "fp8_e4m3", "max_num_batched_tokens": 16384,
    "enable_chunked_prefill": False, "enable_prefix_caching": False,
    "distributed_executor_backend": "mp", "trust_remote_code": True, "revision": "v1.2",
    "engine_args": {"block_size": 32, "hf_overrides": {"rope_theta": 500000.5},
                    "async_scheduling": True, "tokenizer_mode": "slow"},
    "max_request_bytes": 1 << 20, "max_upload_bytes": 3 << 30, "keys_file": "/etc/lp/keys.yaml",
    "keys_inline": "keys: []",
}


def test_every_server_setting_is_settable_and_parses_back(render, monkeypatch):
    assert set(SET_ALL) == FIELDS, "add the new ServerSettings field to the chart and SET_ALL"
    secret = {f: {"secret": f"sec-{f}", "key": "value"} for f in SECRET_ONLY}
    plain = {f: v for f, v in SET_ALL.items() if f not in SECRET_ONLY}
    objs = render({"settings": plain,
                   "secretEnv": {**secret, "registry_url": None, "s3_key": None}})
    secrets = {(f"sec-{f}", "value"): SET_ALL[f] for f in SECRET_ONLY}
    env = effective_env(objs, server_container(objs), secrets)
    assert set(env) >= {f"LORAPLEX_{f.upper()}" for f in FIELDS}

    for k in [k for k in os.environ if k.startswith("LORAPLEX_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = ServerSettings()
    for f, want in SET_ALL.items():
        got = getattr(s, f)
        if hasattr(got, "get_secret_value"):
            got = got.get_secret_value()
        elif isinstance(got, list):
            got = [x.get_secret_value() if hasattr(x, "get_secret_value") else x for x in got]
            want = want.split(",") if isinstance(want, str) else want
        elif f in ("home", "model", "adapter_cache_dir", "keys_file"):
            got = str(got)
        assert got == want, f
    # the derived pod fields follow the settings
    spec, c = pod_spec(server(objs)), server_container(objs)
    assert c["ports"][0]["containerPort"] == 8081
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4  # TP 2 x PP 2
    assert spec["terminationGracePeriodSeconds"] == 10 + 46 + 15
    # and a field moved to a Secret leaves the ConfigMap
    (cm,) = find(objs, "ConfigMap")
    assert not {f"LORAPLEX_{f.upper()}" for f in SECRET_ONLY} & set(cm["data"])


def test_settings_field_types_match_the_schema():
    """values.schema.json types each field as ServerSettings does (integer/number/...)."""
    from pathlib import Path as P

    props = json.loads((CHART / "values.schema.json").read_text())["properties"]
    sprops = props["settings"]["properties"]
    jtype = {int: "integer", float: "number", bool: "boolean", str: "string", P: "string"}
    for f, info in ServerSettings.model_fields.items():
        if f in SECRET_ONLY:
            continue
        ann, args = info.annotation, typing.get_args(info.annotation)
        if typing.get_origin(ann) in (typing.Union, types.UnionType):
            ann = next(a for a in args if a is not type(None))
        if typing.get_origin(ann) is typing.Annotated:
            ann = typing.get_args(ann)[0]
        origin = typing.get_origin(ann)
        want = "array" if origin is list else "object" if origin is dict else jtype[ann]
        got = sprops[f]["type"]
        assert want in (got if isinstance(got, list) else [got]), f


# -- engine options: parallelism, quantization, free-form engine args ------------------------

def test_tensor_parallel_values_request_the_gpus_and_pass_engine_args(render, monkeypatch):
    from loraplex.server.engine import engine_kwargs

    objs = render({"settings": {"tensor_parallel_size": 4, "quantization": "fp8",
                                "kv_cache_dtype": "fp8", "distributed_executor_backend": "mp",
                                "engine_args": {"fully_sharded_loras": True, "block_size": 32,
                                                "hf_overrides": {"rope_theta": 1e6}}}})
    c = server_container(objs)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
    env = effective_env(objs, c)
    assert json.loads(env["LORAPLEX_ENGINE_ARGS"]) == {
        "fully_sharded_loras": True, "block_size": 32, "hf_overrides": {"rope_theta": 1000000}}
    assert env["LORAPLEX_TENSOR_PARALLEL_SIZE"] == "4"
    # and the server reads them back into the engine arguments it would build
    for k in [k for k in os.environ if k.startswith("LORAPLEX_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    kw = engine_kwargs(ServerSettings())
    assert (kw["tensor_parallel_size"], kw["quantization"], kw["kv_cache_dtype"]) == (4, "fp8", "fp8")
    assert kw["distributed_executor_backend"] == "mp" and kw["fully_sharded_loras"] is True
    assert kw["block_size"] == 32 and kw["hf_overrides"] == {"rope_theta": 1000000}
    # unset: no LORAPLEX_ENGINE_ARGS at all, one GPU
    default = render({})
    assert "LORAPLEX_ENGINE_ARGS" not in effective_env(default, server_container(default))
    assert server_container(default)["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_gpu_count_follows_tp_pp_and_data_parallel(render):
    def gpus(values: dict) -> int:
        return server_container(render(values))["resources"]["limits"]["nvidia.com/gpu"]

    assert gpus({"settings": {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}}) == 4
    assert gpus({"settings": {"tensor_parallel_size": 2,
                              "engine_args": {"data_parallel_size": 2}}}) == 4
    assert gpus({"settings": {"tensor_parallel_size": 2}, "gpu": {"count": 3}}) == 3  # larger: ok
    with pytest.raises(helm.HelmError, match="less than the 4 GPUs"):
        render({"settings": {"tensor_parallel_size": 4}, "gpu": {"count": 2}})
    cpu = render({"settings": {"tensor_parallel_size": 2}, "gpu": {"enabled": False}})
    assert not [k for k in server_container(cpu)["resources"]["limits"] if "gpu" in k]


def test_engine_args_schema_refuses_what_a_typed_setting_or_loraplex_owns(render):
    from loraplex.server.engine import _RESERVED
    from loraplex.server.settings import ENGINE_FIELDS

    props = json.loads((CHART / "values.schema.json").read_text())["properties"]
    owned = props["settings"]["properties"]["engine_args"]["propertyNames"]["not"]["enum"]
    assert set(owned) == set(ENGINE_FIELDS) | set(_RESERVED)  # the schema says what the server says
    for bad in [{"tensor_parallel_size": 2}, {"model": "/x"}, {"Block-Size": 16}]:
        with pytest.raises(helm.HelmError):
            render({"settings": {"engine_args": bad}})


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_loraplex_containers_name_their_command(rendered, scenario):
    """The GPU image is built on vllm/vllm-openai (entrypoint `vllm serve`): every loraplex
    container says `loraplex` itself instead of relying on the image's entrypoint."""
    for w in workloads(rendered[scenario]):
        for c in containers(w):
            if c.get("command", [None])[0] == "python":  # the fsspec download scripts
                continue
            cmd = c["command"]
            if cmd[0] == "torchrun":  # multi-GPU training: torchrun --no-python <the command>
                cmd = cmd[cmd.index("--no-python") + 1:]
            assert cmd == ["loraplex"], (w["metadata"]["name"], c["name"])


def test_documented_gpu_examples(rendered):
    """deploy/README.md's two GPU deployments (ci/gpu-8b, ci/gpu-70b-tp4) render as documented."""
    one = server_container(rendered["gpu-8b"])
    env = effective_env(rendered["gpu-8b"], one)
    assert one["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env["LORAPLEX_DTYPE"] == "bfloat16" and env["LORAPLEX_MAX_LORA_RANK"] == "64"
    objs = rendered["gpu-70b-tp4"]
    c, spec = server_container(objs), pod_spec(server(objs))
    env = effective_env(objs, c)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert env["LORAPLEX_TENSOR_PARALLEL_SIZE"] == "4"
    assert env["LORAPLEX_DISTRIBUTED_EXECUTOR_BACKEND"] == "mp"
    assert json.loads(env["LORAPLEX_ENGINE_ARGS"]) == {"fully_sharded_loras": True}
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")["emptyDir"]
    assert shm == {"medium": "Memory", "sizeLimit": "32Gi"}
    assert server(objs)["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0,
                                                                 "maxUnavailable": 1}


def test_readme_gpu_excerpts_are_the_ci_files():
    """Each `# deploy/helm/loraplex/ci/NAME (the engine part)` YAML block of deploy/README.md
    is part of that file, value for value."""
    import re

    readme = (CHART.parents[1] / "README.md").read_text()
    blocks = re.findall(r"```yaml\n# deploy/helm/loraplex/(ci/[\w.-]+) \(the engine part\)\n(.*?)```",
                        readme, re.S)
    assert {name for name, _ in blocks} == {"ci/gpu-8b-values.yaml", "ci/gpu-70b-tp4-values.yaml"}

    def within(part, whole, where):
        if isinstance(part, dict):
            assert isinstance(whole, dict), where
            for k, v in part.items():
                assert k in whole, f"{where}.{k}"
                within(v, whole[k], f"{where}.{k}")
        else:
            assert part == whole, (where, part, whole)

    for name, text in blocks:
        within(yaml.safe_load(text), yaml.safe_load((CHART / name).read_text()), name)


# -- the trainer Job and the registry commands ------------------------------------------------

def test_trainer_job_runs_a_valid_train_command(rendered):
    (job,) = find(rendered["trainer"], "Job", "trainer")
    (train,) = pod_spec(job)["containers"]
    args = train["args"]
    assert args[0] == "train"
    cfg = _print_config(args)
    server_env = effective_env(rendered["trainer"], server_container(rendered["trainer"]))
    values = SCENARIOS["trainer"]["trainer"]
    assert cfg["base"] == server_env["LORAPLEX_MODEL"]  # the model the servers serve
    assert cfg["register"] == values["register"] and cfg["alias"] == values["alias"]
    assert cfg["registry_base"] == "base"  # = served_model_name: what the servers register
    assert cfg["data"] == ["/data"] and cfg["output"] == "/work/adapter"
    for k, v in values["config"].items():
        assert cfg[k] == v, k
    # the same registry and store as the servers, from the same Secrets
    env = {e["name"]: e for e in train["env"]}
    assert env["LORAPLEX_REGISTRY_URL"]["valueFrom"]["secretKeyRef"]["name"] == "loraplex-registry"
    assert env["LORAPLEX_ARTIFACTS_URL"]["value"] == server_env["LORAPLEX_ARTIFACTS_URL"]
    mounts = {m["mountPath"] for m in train["volumeMounts"]}
    assert {"/data", "/work", server_env["LORAPLEX_MODEL"], "/dev/shm", "/tmp"} <= mounts
    assert [c["name"] for c in pod_spec(job)["initContainers"]] == ["download-data"]


def _print_config(args: list[str]) -> dict:
    from loraplex.adapters.cli import main

    out = io.StringIO()
    with redirect_stdout(out):  # the real parser and TrainConfig validation, no training
        assert main(args + ["--print-config"]) == 0
    return yaml.safe_load(out.getvalue())


def test_trainer_gets_its_own_gpus_and_torchrun_for_more_than_one(render):
    base = SCENARIOS["trainer"]
    gpu = "nvidia.com/gpu"

    def train(values: dict) -> dict:
        (job,) = find(render(overlay(base, values)), "Job", "trainer")
        (c,) = pod_spec(job)["containers"]
        return c
    # one GPU when the release uses GPUs (the server's gpu.count is tensor parallelism: not ours)
    c = train({"gpu": {"count": 4}})
    assert c["resources"]["limits"][gpu] == 1 and c["command"] == ["loraplex"]
    assert gpu not in train({"gpu": {"enabled": False}})["resources"]["limits"]
    # N GPUs: one process each through torchrun, which runs the image's own command
    c = train({"trainer": {"gpus": 4}})
    assert c["resources"]["limits"][gpu] == 4
    assert c["command"] == ["torchrun", "--standalone", "--nproc-per-node", "4", "--no-python",
                            "loraplex"]
    assert _print_config(c["args"])["register"] == base["trainer"]["register"]
    with pytest.raises(Exception, match="image.command"):
        train({"trainer": {"gpus": 2}, "image": {"command": []}})


def test_multinode_trainer_is_a_pytorchjob_that_torchrun_understands(rendered):
    """Two 8-GPU nodes: one Master and one Worker with the same pod, `torchrun` with no
    rendezvous flags of its own: the operator passes them as PET_* variables, which torchrun's
    own parser reads (checked here with torch's parser and the variables the operator sets)."""
    from torch.distributed.run import get_args_parser

    values = SCENARIOS["trainer-multinode"]["trainer"]
    (job,) = find(rendered["trainer-multinode"], "PyTorchJob", "trainer")
    spec = job["spec"]
    assert spec["nprocPerNode"] == "8"
    reps = spec["pytorchReplicaSpecs"]
    assert reps["Master"]["replicas"] == 1 and reps["Worker"]["replicas"] == values["nodes"] - 1
    assert reps["Master"]["template"] == reps["Worker"]["template"]
    (c,) = reps["Master"]["template"]["spec"]["containers"]
    assert c["name"] == "pytorch"  # the container the operator configures
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert c["command"] == ["torchrun", "--no-python", "loraplex"]
    cfg = _print_config(c["args"])
    assert cfg["register"] == values["register"] and cfg["gradient_checkpointing"] is True
    operator_env = {"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_NPROC_PER_NODE": "8",
                    "PET_MASTER_ADDR": f"{job['metadata']['name']}-master-0",
                    "PET_MASTER_PORT": "23456"}
    old = {k: os.environ.get(k) for k in operator_env}
    os.environ.update(operator_env)
    try:
        args = get_args_parser().parse_args(c["command"][1:] + c["args"])
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "8")
    assert args.master_addr == operator_env["PET_MASTER_ADDR"] and args.no_python
    assert [args.training_script, *args.training_script_args] == ["loraplex", *c["args"]]


def _run_container(c: dict, secrets: dict, env_over: dict, tmp_path, replace=None):
    """Run a rendered container's command here: its env (secrets resolved), its args."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env.update(effective_env([], c, secrets))
    env.update(env_over)
    argv = [*c.get("command", ["loraplex"]), *c.get("args", [])]
    argv = [(replace or {}).get(a, a) for a in argv]
    if argv[0] == "loraplex":
        argv = [sys.executable, "-m", "loraplex.adapters.cli", *argv[1:]]
    elif argv[0] == "python":
        argv[0] = sys.executable
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)


@pytest.mark.postgres
def test_migration_hook_and_base_registration_work_on_postgres(rendered, pg_url, tmp_path,
                                                               toy_model_dir):
    secrets = {("loraplex-registry", "uri"): pg_url.replace("postgresql+psycopg://",
                                                            "postgresql://"),  # CNPG's form
               ("loraplex-s3", "access-key-id"): "unused",
               ("loraplex-s3", "secret-access-key"): "unused"}
    local = {"LORAPLEX_HOME": str(tmp_path / "home"),
             "LORAPLEX_ARTIFACTS_URL": str(tmp_path / "artifacts")}
    (hook,) = find(rendered["default"], "Job", "migrations")
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    (migrate,) = pod_spec(hook)["containers"]
    for _ in range(2):  # idempotent: every upgrade runs it again
        p = _run_container(migrate, secrets, local, tmp_path)
        assert p.returncode == 0, p.stderr
    # the init container of the initContainer mode registers the served base
    init = next(c for c in pod_spec(server(rendered["trainer"]))["initContainers"]
                if c["name"] == "registry")
    model = effective_env(rendered["trainer"], server_container(rendered["trainer"])
                          )["LORAPLEX_MODEL"]
    for _ in range(2):
        p = _run_container(init, secrets, local, tmp_path, replace={model: str(toy_model_dir)})
        assert p.returncode == 0, p.stderr
    from loraplex.adapters.registry import Registry

    with Registry(pg_url, str(tmp_path / "artifacts")) as reg:
        assert [b.name for b in reg.list_bases()] == ["base"]


@pytest.mark.s3
def test_model_download_init_container_copies_from_s3(rendered, s3_server, tmp_path):
    import s3fs

    from tests.services import create_bucket

    init = next(c for c in pod_spec(server(rendered["download"]))["initContainers"]
                if c["name"] == "download-model")
    url_arg, dest_arg = init["args"][1], init["args"][2]
    src = create_bucket(s3_server) + "/models/tiny"
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server)
    files = {"config.json": b"{}", "model.safetensors": b"\0" * 1000,
             "tokenizer.json": b"{}", "sub/extra.txt": b"x"}
    for name, data in files.items():
        fs.pipe_file(f"{src}/{name}".removeprefix("s3://"), data)
    secrets = {("loraplex-registry", "uri"): "sqlite:///unused.db",
               ("loraplex-s3", "access-key-id"): s3_server["key"],
               ("loraplex-s3", "secret-access-key"): s3_server["secret"]}
    over = {"LORAPLEX_S3_ENDPOINT_URL": s3_server["endpoint_url"]}
    dest = tmp_path / "model"
    dest.mkdir()  # the emptyDir exists before the init container runs
    replace = {url_arg: src, dest_arg: str(dest)}
    p = _run_container(init, secrets, over, tmp_path, replace)
    assert p.returncode == 0, p.stderr
    assert {str(f.relative_to(dest)): f.read_bytes() for f in dest.rglob("*") if f.is_file()
            } == files
    p = _run_container(init, secrets, over, tmp_path, replace)  # container restart: no re-copy
    assert p.returncode == 0 and "already holds files" in p.stdout
    p = _run_container(init, secrets, over, tmp_path,
                       {url_arg: src + "-missing", dest_arg: str(tmp_path / "other")})
    assert p.returncode != 0 and "not a directory" in p.stderr


def test_rendered_names_fit_kubernetes_limits(rendered):
    for objs in rendered.values():
        for o in objs:
            assert len(o["metadata"]["name"]) <= 63, o["metadata"]["name"]
            assert o["metadata"].get("namespace", NAMESPACE) == NAMESPACE


# -- Gateway API Inference Extension: InferencePool + HTTPRoute -------------------------------

def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def test_inference_pool_selects_the_server_pods_on_their_port(rendered):
    """The pool holds exactly the server pods (not the Jobs' pods, which share the release's
    name/instance labels), on the port where each pod serves the API and the /metrics the
    endpoint picker reads (vllm:lora_requests_info); the route sends /v1 to the pool."""
    objs, values = rendered["inferencepool"], SCENARIOS["inferencepool"]
    (pool,) = find(objs, "InferencePool")
    (route,) = find(objs, "HTTPRoute")
    dep, c = server(objs), server_container(objs)
    spec = pool["spec"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert _selects(spec["selector"], pod_labels)
    assert spec["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    (svc,) = find(objs, "Service")
    assert spec["selector"]["matchLabels"] == svc["spec"]["selector"]  # the same pods
    for w in workloads(rendered["trainer"]) + workloads(rendered["default"]):
        if w["kind"] != "Deployment":  # migration hook and trainer pods stay out
            assert not _selects(spec["selector"], w["spec"]["template"]["metadata"]["labels"])
    port = int(effective_env(objs, c)["LORAPLEX_PORT"])
    assert port == values["settings"]["port"] != 8000  # follows the setting, not a constant
    (http,) = [p for p in c["ports"] if p["name"] == "http"]
    assert spec["targetPorts"] == [{"number": http["containerPort"]}] == [{"number": port}]
    assert c["readinessProbe"]["httpGet"]["port"] == "http"  # the gateway only gets ready pods
    # the endpoint picker: the name the extension's inferencepool chart gives it, its port
    assert spec["endpointPickerRef"] == {"name": f"{FULLNAME}-epp", "port": {"number": 9002},
                                         "failureMode": "FailOpen"}
    assert pool["metadata"]["name"] == FULLNAME
    # the route: the configured Gateway, the OpenAI API only, to this pool
    r = route["spec"]
    assert r["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                "name": "inference-gateway", "namespace": "gateway"}]
    assert r["hostnames"] == ["llm.example.com"]
    (rule,) = r["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/v1"}}]
    assert rule["backendRefs"] == [{"group": "inference.networking.k8s.io",
                                    "kind": "InferencePool", "name": FULLNAME}]
    assert rule["timeouts"] == {"request": "300s"}


def test_inference_pool_variants_and_guards(render):
    # off by default (also checked for every scenario by test_each_scenario_turns_its_feature_on)
    assert not find(render({}), "InferencePool") and not find(render({}), "HTTPRoute")
    # the pool without a route (routes managed elsewhere)
    objs = render({"inferencePool": {"enabled": True, "httpRoute": {"enabled": False}}})
    assert len(find(objs, "InferencePool")) == 1 and not find(objs, "HTTPRoute")
    # the extension's chart owns the pool (and its EPP): only the route, to that pool's name
    objs = render({"inferencePool": {"enabled": True, "create": False, "name": "lp-pool",
                                     "httpRoute": {"requestTimeout": "",
                                                   "pathPrefixes": ["/v1", "/tokenize"]}}})
    assert not find(objs, "InferencePool")
    (route,) = find(objs, "HTTPRoute")
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"][0]["name"] == "lp-pool" and "timeouts" not in rule
    assert [m["path"]["value"] for m in rule["matches"]] == ["/v1", "/tokenize"]
    for version in KUBE_VERSIONS[:1]:
        for o in objs:
            crd = CRD_SCHEMAS.get((o["apiVersion"], o["kind"]))
            jsonschema.validate(o, crd) if crd else kv.validate(o, version, strict=True)
    # an explicit EPP name and port; the default failure mode
    (pool,) = find(render({"inferencePool": {"enabled": True, "name": "pool-a", "endpointPicker": {
        "name": "shared-epp", "port": 9102}}}), "InferencePool")
    assert pool["metadata"]["name"] == "pool-a"
    assert pool["spec"]["endpointPickerRef"] == {"name": "shared-epp", "port": {"number": 9102},
                                                 "failureMode": "FailClose"}
    # a long release name: the EPP's name is cut as the extension's chart cuts it (a Service
    # name is at most 63 characters)
    (pool,) = find(render({"fullnameOverride": "x" * 63, "inferencePool": {"enabled": True}}),
                   "InferencePool")
    assert pool["spec"]["endpointPickerRef"]["name"] == "x" * 40 + "-epp"
    with pytest.raises(helm.HelmError, match="parentRefs"):
        render({"inferencePool": {"enabled": True, "httpRoute": {"parentRefs": []}}})
    for bad in [
        {"endpointPicker": {"failureMode": "Open"}},
        {"endpointPicker": {"port": 0}},
        {"name": "Pool_A"},
        {"httpRoute": {"requestTimeout": "5 minutes"}},
        {"httpRoute": {"pathPrefixes": ["v1"]}},
        {"httpRoute": {"parentRefs": [{"gateway": "x"}]}},
        {"targetPortNumber": 8000},  # the v1alpha2 field: the chart derives the port
    ]:
        with pytest.raises(helm.HelmError):
            render({"inferencePool": {"enabled": True, **bad}})


def test_inference_pool_schemas_reject_older_api_shapes(rendered):
    """The CRD subsets are not vacuous: the v1alpha2 and pre-GA v1 field names, a second
    target port and a bad route timeout are rejected."""
    key = ("inference.networking.k8s.io/v1", "InferencePool")
    (pool,) = find(rendered["inferencepool"], "InferencePool")
    (route,) = find(rendered["inferencepool"], "HTTPRoute")
    jsonschema.validate(pool, CRD_SCHEMAS[key])

    def broken(obj, change):
        obj = copy.deepcopy(obj)
        change(obj["spec"])
        return obj

    for change in [
        lambda s: s.update(targetPortNumber=8000),  # v1alpha2
        lambda s: s.update(extensionRef=s.pop("endpointPickerRef")),  # v1alpha2
        lambda s: s["endpointPickerRef"].update(portNumber=9002),  # pre-GA v1
        lambda s: s["endpointPickerRef"].pop("port"),
        lambda s: s["targetPorts"].append({"number": 8001}),
        lambda s: s["selector"].update(matchExpressions=[]),
        lambda s: s["selector"]["matchLabels"].update(bad="not a label value"),
    ]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken(pool, change), CRD_SCHEMAS[key])
    rkey = ("gateway.networking.k8s.io/v1", "HTTPRoute")
    jsonschema.validate(route, CRD_SCHEMAS[rkey])
    for change in [
        lambda s: s["rules"][0]["timeouts"].update(request="5m30"),
        lambda s: s["rules"][0]["backendRefs"][0].update(targetPort=8000),
        lambda s: s["parentRefs"][0].update(namespace="Gateway_NS"),
    ]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken(route, change), CRD_SCHEMAS[rkey])


def test_readme_inference_pool_steps_match_the_chart(render):
    """deploy/README.md section 9: the extension chart's `matchLabels` and target port are the
    chart's server-pod selector and port, and the values block renders a valid pool and route."""
    import re
    import textwrap

    readme = (CHART.parents[1] / "README.md").read_text()
    section = readme[readme.index("## 9. "):readme.index("## 10. ")]
    labels = dict(re.findall(r'matchLabels\."([^"]+)"=(\S+)', section))
    labels = {k.replace("\\.", "."): v for k, v in labels.items()}
    (pool,) = find(render({"inferencePool": {"enabled": True}}), "InferencePool")
    assert labels == pool["spec"]["selector"]["matchLabels"]
    (port,) = re.findall(r"targetPorts\[0\]\.number=(\d+)", section)
    assert [{"number": int(port)}] == pool["spec"]["targetPorts"]
    name = re.search(r"inferencePool\.name=(\S+)", section)[1]
    (route,) = find(render({"inferencePool": {"enabled": True, "create": False, "name": name}}),
                    "HTTPRoute")
    assert route["spec"]["rules"][0]["backendRefs"][0]["name"] == name
    (block,) = re.findall(r"```yaml\n( *inferencePool:\n.*?)```", section, re.S)
    objs = render(yaml.safe_load(textwrap.dedent(block)))
    (pool,) = find(objs, "InferencePool")
    assert pool["spec"]["endpointPickerRef"]["name"] == f"{pool['metadata']['name']}-epp"
    for o in find(objs, "InferencePool") + find(objs, "HTTPRoute"):
        jsonschema.validate(o, CRD_SCHEMAS[(o["apiVersion"], o["kind"])])
