"""`loraplex adapters ...` through the real dispatcher (`loraplex.adapters.cli.main`).

The parser is built from `registry_cli.register` directly, so these tests do not depend on the
entry point being installed; the subprocess test at the end runs once it is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from loraplex.adapters import cli, registry_cli


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path):
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path / "home"))
    for var in ("LORAPLEX_REGISTRY_URL", "LORAPLEX_ARTIFACTS_URL"):
        monkeypatch.delenv(var, raising=False)

    def build_parser() -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog="loraplex")
        registry_cli.register(parser.add_subparsers(dest="command", required=True))
        return parser

    monkeypatch.setattr(cli, "build_parser", build_parser)

    def run_cli(*argv: str) -> tuple[int, str, str]:
        rc = cli.main(["adapters", *map(str, argv)])
        out, err = capsys.readouterr()
        return rc, out, err

    return run_cli


def test_cli_flow(run, models: dict, adapter_copy, tmp_path: Path) -> None:
    rc, out, _ = run("base", "add", "tiny", models["tiny"])
    assert rc == 0 and "base tiny: LlamaForCausalLM, 2 layers" in out
    rc, out, _ = run("base", "list", "--json")
    assert json.loads(out)[0]["name"] == "tiny"

    rc, out, _ = run("push", adapter_copy(note="1"), "--name", "bot", "--tag", "team=support",
                     "--description", "first one")
    assert rc == 0 and out.startswith("registered bot@1")
    rc, out, _ = run("push", adapter_copy(note="2"), "--name", "bot", "--alias", "canary", "--json")
    res = json.loads(out)
    assert res["created"] and res["version"]["version"] == 2 and res["alias"]["alias"] == "canary"
    rc, out, _ = run("push", adapter_copy(note="2"), "--name", "bot")
    assert rc == 0 and "already registered as bot@2; no new version created" in out

    rc, out, _ = run("alias", "set", "bot", "prod", "1:90,2:10")
    assert rc == 0 and out.strip() == "bot:prod -> 1:90,2:10"
    rc, out, _ = run("list")
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["NAME", "VERSION", "ALIASES"]
    assert "prod(90%)" in lines[1] and "first one" in lines[1]
    assert "canary,prod(10%),latest" in lines[2]
    rc, out, _ = run("list", "bot", "--json")
    data = json.loads(out)
    assert [v["version"] for v in data["versions"]] == [1, 2]
    assert {a["alias"] for a in data["aliases"]} == {"canary", "prod"}

    rc, out, _ = run("show", "bot@1")
    assert "tags" in out and "team=support" in out and "adapter_model.safetensors" in out
    rc, out, _ = run("show", "bot:canary", "--json")
    shown = json.loads(out)
    assert shown["version"] == 2 and shown["lora_int_id"] == shown["id"]
    assert set(shown["aliases"]) == {"canary", "prod"}

    rc, out, err = run("archive", "bot@1")
    assert rc == 2 and "error: bot@1 is still the target of alias(es) prod" in err
    run("alias", "set", "bot", "prod", "2")
    rc, out, _ = run("archive", "bot@1")
    assert rc == 0 and out.strip() == "archived bot@1"
    rc, out, _ = run("alias", "rm", "bot", "canary")
    assert rc == 0 and out.strip() == "removed bot:canary"
    rc, out, _ = run("alias", "list", "--json")
    assert [a["alias"] for a in json.loads(out)] == ["prod"]
    rc, out, _ = run("list", "--all")
    assert "archived" in out

    rc, out, _ = run("pull", "bot", tmp_path / "pulled")
    assert rc == 0 and "pulled bot@2" in out and "sha256 verified" in out
    assert (tmp_path / "pulled" / "NOTES.txt").read_text() == "2"


def test_cli_errors(run, models: dict, adapter_copy, tmp_path: Path) -> None:
    run("base", "add", "tiny", models["tiny"])
    d = adapter_copy()
    (d / "adapter_config.json").unlink()
    rc, out, err = run("push", d, "--name", "bot")
    assert rc == 2 and err.startswith("error: adapter") and "adapter_config.json: file: missing" in err
    rc, out, err = run("push", adapter_copy(), "--name", "Bad Name")
    assert rc == 2 and "invalid name 'Bad Name'" in err
    rc, out, err = run("push", adapter_copy(), "--name", "bot", "--tag", "novalue")
    assert rc == 2 and "invalid --tag 'novalue'" in err
    rc, out, err = run("show", "ghost")
    assert rc == 2 and "no adapter named 'ghost'" in err
    rc, out, err = run("alias", "set", "bot", "prod", "1:x")
    assert rc == 2 and "invalid alias target" in err


def test_cli_flags_override_settings(run, models: dict, adapter_copy, tmp_path: Path) -> None:
    url, art = f"sqlite:///{tmp_path / 'elsewhere.db'}", str(tmp_path / "elsewhere-art")
    run("base", "add", "tiny", models["tiny"], "--registry-url", url, "--artifacts-url", art)
    rc, out, _ = run("push", adapter_copy(), "--name", "bot", "--registry-url", url,
                     "--artifacts-url", art)
    assert rc == 0 and (tmp_path / "elsewhere.db").is_file()
    assert any((tmp_path / "elsewhere-art" / "adapters" / "bot").iterdir())
    assert not (tmp_path / "home" / "registry.db").exists()


def _entry_point_registered() -> bool:
    return any(ep.value == "loraplex.adapters.registry_cli:register"
               for ep in entry_points(group="loraplex.commands"))


@pytest.mark.skipif(not _entry_point_registered(),
                    reason="entry point `adapters = loraplex.adapters.registry_cli:register` "
                           "not installed yet")
def test_cli_subprocess(models: dict, tmp_path: Path) -> None:
    env = {**os.environ, "LORAPLEX_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "loraplex.adapters.cli", "adapters"]
    proc = subprocess.run(cmd + ["base", "add", "tiny", str(models["tiny"])], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(cmd + ["push", str(models["adapter"]), "--name", "bot", "--json"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["version"]["version"] == 1
    proc = subprocess.run(cmd + ["show", "nope"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert any(line.startswith("error: no adapter named 'nope'")
               for line in proc.stderr.splitlines()), proc.stderr
