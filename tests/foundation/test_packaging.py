"""The distribution installs three folders under one `loraplex` namespace and nothing top-level."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["server", "trainer", "adapters"])
def test_no_top_level_modules(name, tmp_path):
    # Run from an empty directory: the checkout's folders must not be importable by their bare name.
    r = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr
    ok = subprocess.run([sys.executable, "-c", f"import loraplex.{name}"], cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_adapters_stays_light(tmp_path):
    """Importing the shared package (and its CLI) must not import torch, vllm or peft."""
    code = (
        "import sys, loraplex.adapters, loraplex.adapters.cli, loraplex.adapters.errors\n"
        "import pkgutil, importlib\n"
        "import loraplex.adapters as pkg\n"
        "for m in pkgutil.iter_modules(pkg.__path__):\n"
        "    importlib.import_module('loraplex.adapters.' + m.name)\n"
        "heavy = [m for m in ('torch', 'vllm', 'peft', 'transformers') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"loraplex.adapters imported {r.stdout.strip()}"


def test_wheel_file_list(tmp_path):
    """A built wheel carries loraplex/{server,trainer,adapters} and their data, nothing else top-level."""
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("loraplex-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"loraplex"}, tops
    subs = {n.split("/")[1] for n in names if n.startswith("loraplex/")}
    assert subs == {"server", "trainer", "adapters"}, subs
    assert not any(n.startswith("loraplex/__init__") for n in names), "loraplex must stay a namespace"
    for must in ("loraplex/adapters/cli.py", "loraplex/trainer/toy.py", "loraplex/trainer/data/corpus.txt",
                 "loraplex/adapters/templates/chatml.jinja"):
        assert must in names, must
    # Every sub-package folder of the checkout made it into the wheel (a forgotten one in
    # pyproject's explicit package list would ship a broken install).
    for folder in ("server", "trainer", "adapters"):
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.relative_to(ROOT / folder).as_posix()
            assert f"loraplex/{folder}/{rel}" in names, f"{folder}/{rel} missing from the wheel"
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "loraplex = loraplex.adapters.cli:main" in entry


def test_cli_lists_commands():
    r = subprocess.run([sys.executable, "-m", "loraplex.adapters.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "toy-model" in r.stdout
    assert "warning" not in r.stderr, r.stderr


def test_readme_commands_match_ci():
    """The README's test command is what CI runs; its first command sets up and runs the demo
    (`make demo`: the shell script examples/demo.sh, tested by tests/server/test_demo.py)."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```", 2)[1]
    lines = [ln.split("#")[0].strip() for ln in block.splitlines()[1:] if ln.split("#")[0].strip()]
    assert lines == ["make demo", "make test"], lines
    assert (ROOT / ".ci/run").read_text().rstrip().endswith("make test")


def test_make_demo_runs_the_demo_script():
    """`make demo` runs examples/demo.sh (a shell script of loraplex commands; the registry
    package holds no demo code)."""
    # Not as a sub-make of `make test` (CI): no "make[1]: Leaving directory" after the recipe.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    r = subprocess.run(["make", "-n", "--no-print-directory", "demo"], cwd=ROOT,
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "bash examples/demo.sh" in r.stdout.splitlines()[-1]
    assert subprocess.run(["bash", "-n", str(ROOT / "examples" / "demo.sh")]).returncode == 0
    assert not (ROOT / "adapters" / "demo.py").exists()
