"""`loraplex eval` and `loraplex adapters promote` against the real `served` server.

The toy's answers are nonsense, but the test adapters are not: `upper` answers in capitals,
`reverse` in lower case (tests/conftest.py). So an IFEval-style `case: upper` check passes for
`upper` and fails for `reverse` and the base, deterministically (greedy decoding), and a gate on
it accepts an `upper` candidate over a `reverse` baseline and refuses the opposite. Few prompts
and small max_tokens keep every test to seconds.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pytest

from loraplex.adapters import cli

KEY_ENV = "LORAPLEX_TEST_EVAL_KEY"
FAST = ["--max-tokens", "12", "--api-key-env", KEY_ENV, "--concurrency", "4"]


@pytest.fixture
def shout_set(tmp_path: Path, task_prompts) -> Path:
    """Prompts the `upper` adapter was tuned on, each with a `case: upper` check."""
    path = tmp_path / "shout.jsonl"
    path.write_text("".join(json.dumps({"id": f"s{i}", "prompt": q, "reference": a, "checks": [
        {"type": "case", "case": "upper"}]}) + "\n"
        for i, (q, a) in enumerate(task_prompts("upper", 4, seed=0))))
    return path


@pytest.fixture
def golden_set(tmp_path: Path, task_prompts) -> Path:
    """Exact match and a regex on the `reverse` task."""
    path = tmp_path / "golden.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "expected": a, "checks": [
        {"type": "regex", "pattern": "^[a-z ]+$", "full": True}]}) + "\n"
        for q, a in task_prompts("reverse", 3, seed=0)))
    return path


def adapters(served, *argv: str) -> int:
    return cli.main(["adapters", *argv, "--registry-url", served.registry.url,
                     "--artifacts-url", str(served.home / "artifacts")])


@pytest.mark.engine
def test_eval_base_and_adapters_side_by_side(served, shout_set, golden_set, tmp_path, capsys,
                                             monkeypatch):
    monkeypatch.setenv(KEY_ENV, "test-key")
    out, chart = tmp_path / "eval.json", tmp_path / "eval.png"
    rc = cli.main(["eval", "toy", "upper", "reverse", "--set", str(shout_set), "--set",
                   f"rev={golden_set}", "--url", served.v1, *FAST, "--output", str(out),
                   "--chart", str(chart), "--judge-model", "toy", "--judge-max-tokens", "4",
                   "--registry-url", served.registry.url])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    header = printed.out.splitlines()[0].split()
    assert header == ["FIGURE", "toy", "(base)", "upper", "(@1)", "reverse", "(@1)"]
    assert "shout.if_case" in printed.out and "rev.exact_match" in printed.out
    res = json.loads(out.read_text())
    figs = {m["label"]: m["figures"] for m in res["models"]}
    assert [m["served_as"] for m in res["models"]] == ["toy", "upper@1", "reverse@1"]
    assert figs["upper (@1)"]["shout"]["if_case"] == 1.0
    assert figs["reverse (@1)"]["shout"]["if_case"] == 0.0
    assert figs["toy (base)"]["shout"]["if_case"] == 0.0
    assert figs["upper (@1)"]["rev"]["regex"] == 0.0  # capitals never match ^[a-z ]+$
    for f in figs.values():
        assert f["shout"]["n"] == 4 and f["shout"]["errors"] == 0 and f["rev"]["n"] == 3
        # the toy judges in nonsense: every rating is a counted failure, none crashes the run
        assert f["shout"]["judge_n"] + f["shout"]["judge_failures"] == 4
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # stored on the pinned versions, with the set's hash; the base has no version record
    sha = hashlib.sha256(shout_set.read_bytes()).hexdigest()
    stored = served.registry.show("upper@1").metrics["evals"]["shout"]
    assert stored["sha256"] == sha and stored["figures"] == figs["upper (@1)"]["shout"]
    assert stored["served_as"] == "upper@1" and stored["server"] == served.v1
    assert stored["judge"]["model"] == "toy"
    assert "stored on upper@1" in printed.err and "stored on reverse@1" in printed.err


def _two_versions(served, test_loras, first: str, second: str) -> str:
    name = f"promo-{uuid.uuid4().hex[:8]}"
    for task in (first, second):
        served.registry.push(test_loras[task], name, base="toy")
    served.registry.set_alias(name, "prod", 1)
    return name


@pytest.fixture
def gate_file(tmp_path: Path, shout_set: Path) -> Path:
    path = tmp_path / "gate.yaml"
    path.write_text(f"sets: [{shout_set.name}]\nrules:\n"
                    "  shout.pass_rate: {min: 0.75, max_regression: 0}\n"
                    "  shout.errors: {max: 0}\n")
    return path


@pytest.mark.engine
def test_promotion_canary_then_full(served, test_loras, gate_file, capsys, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "test-key")
    name = _two_versions(served, test_loras, "reverse", "upper")
    argv = ["promote", name, "--candidate", "2", "--to", "prod", "--gate", str(gate_file),
            "--url", served.v1, *FAST, "--actor", "ci-bot"]
    rc = adapters(served, *argv, "--canary", "10")
    printed = capsys.readouterr()
    assert rc == 0, printed.out + printed.err
    out = printed.out
    assert f"canary: {name}:prod 1 -> 1:90,2:10" in out
    assert served.registry.aliases(name)[0].weights == [(1, 90), (2, 10)]
    # the canary passed: complete it (the baseline is still version 1, the split's heavier side)
    rc = adapters(served, *argv)
    printed = capsys.readouterr()
    assert rc == 0, printed.out + printed.err
    assert f"promoted: {name}:prod 1:90,2:10 -> 2" in printed.out
    assert served.registry.resolve(f"{name}:prod").version == 2
    done, canary = served.registry.promotions(name)
    assert (done.outcome, canary.outcome) == ("promoted", "canary")
    assert done.actor == "ci-bot" and done.baseline == 1 and canary.canary_percent == 10
    assert done.figures["candidate"]["shout.pass_rate"] == 1.0
    assert done.figures["baseline"]["shout.pass_rate"] == 0.0
    assert all(r.passed for r in done.rules) and len(done.rules) == 3
    assert done.evals["shout"]["sha256"] == hashlib.sha256(
        (gate_file.parent / "shout.jsonl").read_bytes()).hexdigest()
    assert done.gate["sha256"] == hashlib.sha256(gate_file.read_bytes()).hexdigest()
    # both sides' figures are on their version records too
    assert served.registry.show(f"{name}@2").metrics["evals"]["shout"]["figures"][
        "pass_rate"] == 1.0
    assert adapters(served, "show", name) == 0
    shown = capsys.readouterr().out
    assert f"promotions of {name} (newest first):" in shown and "ci-bot" in shown


@pytest.mark.engine
def test_promotion_refused_leaves_the_alias(served, test_loras, gate_file, capsys, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "test-key")
    name = _two_versions(served, test_loras, "upper", "reverse")
    rev = served.registry.revision()
    rc = adapters(served, "promote", name, "--candidate", "2", "--gate", str(gate_file),
                  "--url", served.v1, *FAST, "--actor", "ci-bot")
    printed = capsys.readouterr()
    out = printed.out
    assert rc == 1, out + printed.err
    assert f"rejected: {name}:prod stays at 1" in out and "FAIL" in out
    assert served.registry.resolve(f"{name}:prod").version == 1
    assert served.registry.revision() == rev  # nothing moved: the servers have nothing to see
    (d,) = served.registry.promotions(name)
    assert d.outcome == "rejected" and d.before == d.after == [(1, 100)]
    failed = {(r.metric, r.rule) for r in d.failed_rules}
    assert failed == {("shout.pass_rate", "min"), ("shout.pass_rate", "max_regression")}
    assert d.figures["candidate"]["shout.pass_rate"] == 0.0
    assert adapters(served, "show", f"{name}@1", "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["promotions"][0]["outcome"] == "rejected"
