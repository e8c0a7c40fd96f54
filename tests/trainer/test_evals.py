"""`loraplex eval` and the promotion gate without a server: every check type on hand-made
answers (true and false), eval-set reading, the judge's score parsing and failure counting, the
runner against a scripted client, the gate's rules, the canary split, and the registry's eval
results and promotion decisions (SQLite; PostgreSQL where its binaries are installed).

The end-to-end runs through a real `loraplex serve` are in tests/server/test_eval_promote.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from loraplex.adapters.errors import BadRequest, ConfigError
from loraplex.trainer.evals import checks, gate, judge, runner, sets
from loraplex.trainer.evals.checks import CheckSpecError
from loraplex.trainer.evals.promote import plan

# -- every check type: (spec, an answer that passes, an answer that fails) -------------------------

CASES = [
    ({"type": "exact_match", "value": "CAT DOG"}, "  CAT DOG\n", "CAT DOGS"),
    ({"type": "exact_match", "value": "cat dog", "ignore_case": True}, "Cat Dog", "cat"),
    ({"type": "contains", "value": "paris"}, "It is paris.", "It is Paris."),
    ({"type": "contains", "values": ["a", "b"], "ignore_case": True}, "A and B", "A only"),
    ({"type": "not_contains", "value": "sorry"}, "Sure, here it is.", "I'm sorry, no."),
    ({"type": "regex", "pattern": r"^[A-Z ]+$", "full": True}, "CAT DOG", "CAT dog"),
    ({"type": "regex", "pattern": r"\d{3}", "flags": "i"}, "call 555 now", "call me"),
    ({"type": "json_schema", "schema": {"type": "object", "required": ["a"],
                                        "properties": {"a": {"type": "integer"}}}},
     '```json\n{"a": 1}\n```', '{"a": "one"}'),
    ({"type": "word_count", "min": 3, "max": 5}, "one two three four", "one two"),
    ({"type": "word_count", "max": 3}, "it's well-known", "a b c d"),
    ({"type": "sentence_count", "min": 2, "max": 2}, "It rains. We stay in!", "It rains."),
    ({"type": "paragraph_count", "min": 2, "max": 2}, "First.\n\nSecond.", "Only one."),
    ({"type": "paragraph_count", "min": 2, "max": 2, "separator": "***"}, "A.\n***\nB.",
     "A.\n\nB."),
    ({"type": "keywords", "words": ["harvest", "lantern"]}, "A Harvest lantern glows.",
     "A harvest moon."),
    ({"type": "forbidden_words", "words": ["sun"]}, "Sunday is calm.", "The sun sets."),
    ({"type": "keyword_frequency", "word": "bottle", "min": 2}, "bottle, Bottle!", "a bottle"),
    ({"type": "forbidden_chars", "chars": ","}, "no commas here", "one, two"),
    ({"type": "case", "case": "upper"}, "CAT DOG 42!", "CAT Dog"),
    ({"type": "case", "case": "lower"}, "cat dog", "cat Dog"),
    ({"type": "capital_words", "min": 2}, "be VERY VERY careful", "be Very careful"),
    ({"type": "json_format"}, '{"fruits": ["a"]}', "fruits: a"),
    ({"type": "bullets", "n": 2}, "Tips:\n* one\n- two", "* one\n**bold**\n* two\n* three"),
    ({"type": "starts_with", "text": "Once"}, "once upon a time", "There once was"),
    ({"type": "ends_with", "text": "Any questions?"}, "Done. Any questions?  ",
     "Any questions? Bye"),
    ({"type": "quotation"}, '"Bubbles"', 'Bubbles "the fish"'),
    ({"type": "title"}, "<<Moon song>>\nThe moon...", "Moon song\nThe moon..."),
    ({"type": "placeholders", "min": 2}, "Dear [name], at [place]", "Dear [name]"),
    ({"type": "highlights", "min": 2}, "*one* and **two**", "*one* only"),
    ({"type": "postscript"}, "Bye.\nP.S. see you", "Bye. PS see you"),
]


@pytest.mark.parametrize("spec,good,bad", CASES,
                         ids=[f"{c[0]['type']}-{i}" for i, c in enumerate(CASES)])
def test_check_true_and_false(spec: dict, good: str, bad: str) -> None:
    checks.validate(spec)
    ok = checks.run(spec, good)
    assert ok.passed and ok.detail == "", ok
    no = checks.run(spec, bad)
    assert not no.passed and no.detail, no


def test_every_check_type_is_covered() -> None:
    assert {c[0]["type"] for c in CASES} == set(checks.check_types())


@pytest.mark.parametrize("spec,message", [
    ({"type": "nope"}, "unknown check type 'nope'"),
    ("contains", "a JSON object"),
    ({"type": "regex"}, "needs pattern"),
    ({"type": "regex", "pattern": "("}, "check 'regex'"),
    ({"type": "regex", "pattern": "a", "flags": "x"}, "flags"),
    ({"type": "contains", "value": "a", "typo": 1}, "unknown argument(s) typo"),
    ({"type": "contains"}, "give `value`"),
    ({"type": "json_schema", "schema": {"type": "nonsense"}}, "check 'json_schema'"),
    ({"type": "word_count"}, "give `min`, `max` or both"),
    ({"type": "word_count", "min": 5, "max": 2}, "`min` is above `max`"),
    ({"type": "case", "case": "title"}, '"upper" or "lower"'),
    ({"type": "bullets", "n": -1}, "non-negative"),
    ({"type": "keywords", "words": []}, "non-empty list"),
])
def test_bad_check_specs_fail_early(spec: Any, message: str) -> None:
    with pytest.raises(CheckSpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        checks.validate(spec)


# -- eval sets ----------------------------------------------------------------------------------

def test_set_rows_and_hash(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "prompt": "shout cat", "expected": "CAT"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]},
        {"instruction": "Name it", "input": "goat", "output": "An animal."},
        {"instruction": "Say hi", "checks": [{"type": "contains", "value": "hi"}]},
        {"prompt": "free text", "system": "be brief", "reference": "anything"},
    ]
    path = tmp_path / "golden.jsonl"
    path.write_text("// a comment\n\n" + "".join(json.dumps(r) + "\n" for r in rows))
    (s,) = sets.load_sets([str(path)])
    assert s.name == "golden" and len(s.items) == 5
    import hashlib

    assert s.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    a, b, c, d, e = s.items
    assert a.id == "a" and a.checks == [{"type": "exact_match", "value": "CAT"}]
    assert b.messages == [{"role": "user", "content": "q"}] and b.reference == "r"
    assert b.checks == [{"type": "exact_match", "value": "r"}]
    assert c.messages[-1]["content"] == "Name it\n\ngoat" and c.reference == "An animal."
    assert d.checks[0]["type"] == "contains" and d.reference is None
    assert e.checks == [] and e.reference == "anything" and e.messages[0]["role"] == "system"
    named = sets.load_sets([f"qa={path}"], limit=2)[0]
    assert named.name == "qa" and len(named.items) == 2 and named.sha256 == s.sha256


def test_bundled_ifeval_set() -> None:
    (s,) = sets.load_sets(["ifeval"])
    assert s.name == "ifeval" and len(s.items) >= 20
    kinds = {c["type"] for it in s.items for c in it.checks}
    assert {"word_count", "sentence_count", "keywords", "forbidden_chars", "case",
            "json_format", "bullets"} <= kinds


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "x", "checks": [{"type": "regex", "pattern": "("}]}', "bad.jsonl:2: check"),
    ('{"prompt": "x", "expected": 3}', "bad.jsonl:2: `expected` must be a string"),
    ("not json", "bad.jsonl:2:"),
    ('{"id": "a", "prompt": "again"}', "bad.jsonl:2: id 'a' appears twice"),
    ('{"what": 1}', "bad.jsonl:2: unrecognized row"),
])
def test_bad_rows_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "prompt": "fine"}\n' + line + "\n")
    with pytest.raises(BadRequest, match=message.replace("(", r"\(")):
        sets.load_sets([str(path)])


def test_duplicate_set_names_and_no_sets(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_text('{"prompt": "x"}\n')
    with pytest.raises(BadRequest, match="two eval sets are named 'a'"):
        sets.load_sets([str(p), str(p)])
    with pytest.raises(BadRequest, match="no eval set"):
        sets.load_sets([])


# -- the judge ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text,score", [
    ("The answer is fine.\nScore: 8", 8.0),
    ("Rating: [[7]]", 7.0),
    ("It misses 2 of 3 points. Score: 4/10", 4.0),
    ('{"score": 9, "reason": "ok"}', 9.0),
    ("I'd give it 6 out of 10.", 6.0),
    ("**5**", 5.0),
    ("Score: 7.5", 7.5),
    ("Score: 11", None),
    ("Score: 0", None),
    ("no number at all", None),
    ("", None),
])
def test_judge_score_parsing(text: str, score: float | None) -> None:
    assert judge.parse_score(text) == score


def test_judge_prompt_is_fixed() -> None:
    msgs = judge.judge_messages([{"role": "user", "content": "Q?"}], "A.", "R.")
    assert msgs[0]["content"] == judge.SYSTEM and judge.RUBRIC in msgs[1]["content"]
    assert "[USER'S REQUEST]\nQ?" in msgs[1]["content"] and "[REFERENCE ANSWER]\nR." in msgs[1][
        "content"] and msgs[1]["content"].rstrip().endswith("Score: N")
    assert len(judge.RUBRIC_SHA256) == 64


# -- the runner against a scripted client ---------------------------------------------------------

class Scripted:
    """An AsyncOpenAI stand-in: `answer(model, messages)` -> text, or an exception to raise."""

    def __init__(self, answer, models: dict[str, dict] | None = None):
        self.answer, self.models_info = answer, models or {}
        self.calls: list[dict] = []
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))
        self.models = SimpleNamespace(retrieve=self._retrieve)
        self.closed = False

    async def _create(self, **params):
        self.calls.append(params)
        out = self.answer(params["model"], params["messages"])
        if isinstance(out, BaseException):
            raise out
        msg = SimpleNamespace(content=out)
        return SimpleNamespace(choices=[SimpleNamespace(message=msg, finish_reason="stop")],
                               usage=SimpleNamespace(prompt_tokens=3, completion_tokens=2))

    async def _retrieve(self, model):
        return SimpleNamespace(model_extra=self.models_info[model])

    async def close(self):
        self.closed = True


def _status_error(status: int):
    import httpx
    import openai

    req = httpx.Request("POST", "http://x/v1/chat/completions")
    resp = httpx.Response(status, request=req, json={"error": {"message": "boom"}})
    return openai.APIStatusError("boom", response=resp, body=None)


def _settings(**kw):
    from loraplex.trainer.evals.settings import EvalSettings

    return EvalSettings(url="http://127.0.0.1:9/v1", max_retries=0, **kw)


def test_runner_figures_errors_and_judge(tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    rows = [{"id": str(i), "prompt": w, "expected": w.upper(),
             "checks": [{"type": "case", "case": "upper"}]} for i, w in enumerate(
                 ["cat", "dog", "owl", "fail"])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (s,) = sets.load_sets([str(path)])

    def answer(model, messages):
        q = messages[-1]["content"]
        if model == "shout@1":
            return _status_error(400) if q == "fail" else q.upper()
        if model == "judge":
            return "Score: 9" if "[ANSWER]\nCAT" in messages[-1]["content"] else "no idea"
        return q

    client, judge_client = Scripted(answer), Scripted(answer)
    from loraplex.trainer.evals.settings import JudgeSettings

    run = runner.evaluate([runner.Target.pinned("shout", 1), runner.Target("toy", "toy", "toy",
                                                                             "base")],
                          [s], _settings(), runner.Sampling(max_tokens=8, seed=3),
                          JudgeSettings(model="judge", max_retries=0),
                          client=client, judge_client=judge_client)
    f = run.figures(0, "g")
    assert f["n"] == 4 and f["errors"] == 1
    assert f["pass_rate"] == 0.75 and f["exact_match"] == 0.75 and f["if_case"] == 0.75
    assert f["check_rate"] == 0.75
    # 3 answers judged: one scored, two replies without a score; the failed request unjudged
    assert f["judge_mean"] == 9.0 and f["judge_n"] == 1 and f["judge_failures"] == 2
    base = run.figures(1, "g")
    assert base["pass_rate"] == 0.0 and base["errors"] == 0 and base["judge_failures"] == 4
    assert base["judge_mean"] is None and base["judge_n"] == 0
    assert run.flat(0)["g.pass_rate"] == 0.75
    # one 1-token warm-up request per adapter first (not for the base), then the run's
    assert [c["model"] for c in client.calls if c["max_tokens"] == 1] == ["shout@1"]
    calls = [c for c in client.calls if c["max_tokens"] != 1]
    assert len(calls) == 8 and {c["model"] for c in calls} == {"shout@1", "toy"}
    assert all(c["max_tokens"] == 8 and c["temperature"] == 0.0 and c["seed"] == 3
               for c in calls)
    items = run.to_json()["models"][0]["items"]["g"]
    assert items[3]["error"] and items[3]["checks"][0]["detail"] == "no answer"
    stored = run.stored_result(0, s)
    assert stored["sha256"] == s.sha256 and stored["served_as"] == "shout@1"
    assert stored["judge"]["rubric_sha256"] == judge.RUBRIC_SHA256
    assert not client.closed  # a client given is the caller's to close


def test_warm_up_waits_for_a_just_pushed_version() -> None:
    """A server that does not know a new version yet (404) is asked again a moment later."""
    import httpx
    import openai

    def not_found():
        req = httpx.Request("POST", "http://x/v1/chat/completions")
        return openai.NotFoundError("no adapter", response=httpx.Response(404, request=req),
                                    body=None)

    answers = iter([not_found(), not_found(), "ok"])
    client = Scripted(lambda m, q: next(answers))
    msgs = [{"role": "user", "content": "hi"}]
    asyncio.run(runner.warm_up(client, "new@1", msgs, wait_s=0))
    assert [c["max_tokens"] for c in client.calls] == [1, 1, 1]
    # still unknown after every try: left to the run (which stops on the 404)
    client = Scripted(lambda m, q: not_found())
    asyncio.run(runner.warm_up(client, "ghost@1", msgs, tries=2, wait_s=0))
    assert len(client.calls) == 2


def test_runner_stops_on_an_unknown_model(tmp_path: Path) -> None:
    from loraplex.trainer.datagen.client import TeacherUnavailable

    (s,) = sets.load_sets(["ifeval"], limit=2)
    with pytest.raises(TeacherUnavailable, match="no such model"):
        runner.evaluate([runner.Target.pinned("ghost", 1)], [s], _settings(),
                        runner.Sampling(), client=Scripted(lambda m, q: _status_error(404)))


def test_resolve_targets() -> None:
    client = Scripted(lambda m, q: "", models={
        "toy": {"parent": None, "root": "/models/toy"},
        "words": {"parent": "toy", "root": "words@3", "versions": [1, 2, 3], "aliases": {}},
        "lists": {"parent": "toy", "root": "lists@1", "versions": [1, 2],
                  "aliases": {"prod": "1:90,2:10"}},
        "words:prod": {"parent": "toy", "root": "words:prod", "target": "2"},
        "words:canary": {"parent": "toy", "root": "words:canary", "target": "2:90,3:10"},
    })

    def resolve(ref):
        return asyncio.run(runner.resolve_target(client, ref))

    assert (resolve("toy").kind, resolve("toy").label) == ("base", "toy (base)")
    w = resolve("words")
    assert (w.kind, w.model, w.version, w.label) == ("version", "words@3", 3, "words (@3)")
    assert resolve("words:prod").model == "words@2"
    assert resolve("words@7").model == "words@7" and not client.calls
    for ref in ("words:canary", "lists"):
        t = resolve(ref)
        assert t.kind == "split" and t.model == ref and "stored on no version" in t.note


# -- gates -------------------------------------------------------------------------------------

def _gate(tmp_path: Path, text: str) -> gate.Gate:
    path = tmp_path / "gate.yaml"
    path.write_text(text)
    return gate.load_gate(path)


GATE = """
sets: [golden.jsonl, ifeval]
rules:
  golden.pass_rate: {min: 0.5, max_regression: 0.05}
  ifeval.pass_rate: {max_regression: 0}
  golden.errors: {max: 0}
  judge_mean: {min: 6}
"""


def test_gate_floors_margins_and_missing(tmp_path: Path) -> None:
    g = _gate(tmp_path, GATE)
    assert g.set_args() == ["golden.jsonl", "ifeval"] and len(g.sha256) == 64
    cand = {"golden.pass_rate": 0.62, "golden.errors": 0, "ifeval.pass_rate": 0.30,
            "golden.judge_mean": 7.0}
    base = {"golden.pass_rate": 0.66, "golden.errors": 0, "ifeval.pass_rate": 0.30}
    res = gate.judge(g, cand, base)
    assert [(r.metric, r.rule, r.passed) for r in res] == [
        ("golden.pass_rate", "min", True), ("golden.pass_rate", "max_regression", True),
        ("ifeval.pass_rate", "max_regression", True), ("golden.errors", "max", True),
        ("golden.judge_mean", "min", True)]
    assert res[-1].detail == "" and res[2].baseline == 0.30
    # a regression beyond the margin, a floor missed, a ceiling passed over
    worse = {**cand, "golden.pass_rate": 0.45, "golden.errors": 1}
    failed = [(r.metric, r.rule, r.detail) for r in gate.judge(g, worse, base) if not r.passed]
    assert failed == [("golden.pass_rate", "min", "0.45 < 0.5"),
                      ("golden.pass_rate", "max_regression",
                       "0.45 vs baseline 0.66 (-0.21), beyond the margin 0.05"),
                      ("golden.errors", "max", "1 > 0")]
    # a missing figure fails its rules; no baseline: regression rules pass, floors still apply
    missing = {k: v for k, v in cand.items() if k != "golden.judge_mean"}
    res = gate.judge(g, missing, None)
    assert [(r.metric, r.passed, r.detail) for r in res if r.rule == "max_regression"] == [
        ("golden.pass_rate", True, "no baseline"), ("ifeval.pass_rate", True, "no baseline")]
    (judge_rule,) = [r for r in res if r.metric == "judge_mean"]
    assert not judge_rule.passed and judge_rule.detail.startswith("missing")
    assert [r.passed for r in gate.judge(g, {**cand, "ifeval.pass_rate": None}, base)
            if r.metric == "ifeval.pass_rate"] == [False]
    # the baseline lacking a figure is no regression
    (r,) = [r for r in gate.judge(g, cand, {}) if r.metric == "ifeval.pass_rate"]
    assert r.passed and r.detail == "the baseline has no such figure"


def test_gate_lower_is_better(tmp_path: Path) -> None:
    g = _gate(tmp_path, "sets: [a.jsonl]\nrules:\n  a.errors: {max_regression: 1, "
                        "lower_is_better: true}\n")
    assert gate.judge(g, {"a.errors": 3}, {"a.errors": 2})[0].passed
    assert not gate.judge(g, {"a.errors": 4}, {"a.errors": 2})[0].passed


@pytest.mark.parametrize("text,message", [
    ("rules: {a.x: {min: 1}}", "sets"),
    ("sets: [a.jsonl]\nrules: {a.x: {}}", "a rule needs min, max or max_regression"),
    ("sets: [a.jsonl]\nrules: {a.x: {minimum: 1}}", "minimum"),
    ("sets: [a.jsonl]\nrules: {a.x: {max_regression: -1}}", "max_regression"),
    ("- just a list", "must be a mapping"),
    ("sets: [a.jsonl\n", "not YAML"),
])
def test_bad_gates(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _gate(tmp_path, text)


def test_gate_rules_must_name_its_sets(tmp_path: Path) -> None:
    g = _gate(tmp_path, "sets: [a.jsonl]\nrules: {b.pass_rate: {min: 1}}")
    with pytest.raises(ConfigError, match="names set 'b'"):
        gate.check_rule_names(g, ["a"])


# -- the alias the gate would set ---------------------------------------------------------------

def test_promotion_plan() -> None:
    assert plan([(3, 100)], 4, None) == (3, [(4, 100)])
    assert plan(None, 1, None) == (None, [(1, 100)])
    assert plan([(3, 100)], 4, 10) == (3, [(3, 90), (4, 10)])
    assert plan([(3, 90), (4, 10)], 4, None) == (3, [(4, 100)])  # finishing a canary
    assert plan([(3, 90), (4, 10)], 4, 50) == (3, [(3, 50), (4, 50)])
    assert plan([(1, 3), (2, 1)], 5, 20) == (1, [(1, 60), (2, 20), (5, 20)])
    with pytest.raises(BadRequest, match="already points at version 4"):
        plan([(4, 100)], 4, None)
    with pytest.raises(BadRequest, match="does not exist"):
        plan(None, 1, 10)
    with pytest.raises(BadRequest, match="1 to 99"):
        plan([(3, 100)], 4, 100)


# -- the registry: eval results and decisions ----------------------------------------------------

def _seed_registry(reg, name: str = "bot", versions: int = 2) -> None:
    """A base and `versions` versions inserted as rows (no adapter files: fast)."""
    from sqlalchemy import insert

    from loraplex.adapters import sql
    from loraplex.adapters.records import AdapterVersion

    with sql.write_tx(reg.engine) as conn:
        sql.bump_revision(conn)
        conn.execute(insert(sql.bases_t).values(
            name="tiny", fingerprint="sha256:0", created_at=sql.utcnow(),
            record={"name": "tiny", "fingerprint": "sha256:0", "modules": {}, "num_layers": 1}))
        for n in range(1, versions + 1):
            v = AdapterVersion(id=n, name=name, version=n, base_name="tiny",
                               base_fingerprint="sha256:0", peft_type="LORA", rank=4, alpha=8,
                               target_modules=["q_proj"], artifact_uri=f"file:///x/{n}",
                               content_sha256=f"{n:064d}", files={}, total_size=1,
                               created_at=sql.utcnow(), metrics={"train_loss": 0.5})
            conn.execute(insert(sql.versions_t).values(id=n, **sql.version_columns(v)))


def _decision(outcome: str = "promoted", **kw):
    from loraplex.adapters.records import PromotionDecision, RuleResult

    rule = RuleResult(metric="g.pass_rate", rule="min", threshold=0.5, candidate=0.8,
                      baseline=0.4, passed=outcome != "rejected",
                      detail="" if outcome != "rejected" else "0.4 < 0.5")
    return PromotionDecision(**{"name": "bot", "alias": "prod", "candidate": 2, "baseline": 1,
                                "outcome": outcome, "actor": "alice", "rules": [rule],
                                "figures": {"candidate": {"g.pass_rate": 0.8}}, **kw})


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def registry(request, tmp_path: Path):
    from loraplex.adapters.registry import Registry

    url = (request.getfixturevalue("pg_url") if request.param == "postgres"
           else f"sqlite:///{tmp_path / 'registry.db'}")
    reg = Registry(url, str(tmp_path / "artifacts"))
    _seed_registry(reg)
    yield reg
    reg.close()


def test_eval_results_on_the_version(registry, tmp_path: Path) -> None:
    from loraplex.adapters.registry import Registry

    assert registry.show("bot@1").metrics == {"train_loss": 0.5}  # cached parse
    rev = registry.revision()
    res = {"figures": {"pass_rate": 0.75, "n": 4}, "sha256": "ab" * 32, "served_as": "bot@1"}
    v = registry.record_eval("bot@1", "golden", res)
    assert v.metrics == {"train_loss": 0.5, "evals": {"golden": res}}
    registry.record_eval("bot@1", "ifeval", {"figures": {"pass_rate": 0.1}})
    assert registry.revision() == rev  # servers do not read metrics: no revision bump
    # every reader sees it: this instance (its parse cache) and a fresh one
    assert set(registry.show("bot@1").metrics["evals"]) == {"golden", "ifeval"}
    with Registry(registry.url, str(tmp_path / "artifacts")) as other:
        assert other.show("bot@1").metrics["evals"]["golden"] == res
        assert other.snapshot().resolve("bot@1").metrics["evals"]["golden"] == res
    registry.archive("bot@1")
    assert registry.show("bot@1").metrics["evals"]["golden"] == res  # archive keeps them
    with pytest.raises(BadRequest, match="explicit version"):
        registry.record_eval("bot", "golden", res)
    with pytest.raises(BadRequest, match="JSON-serializable"):
        registry.record_eval("bot@2", "golden", {"x": float("nan")})
    from loraplex.adapters.errors import AdapterNotFound

    with pytest.raises(AdapterNotFound):
        registry.record_eval("bot@9", "golden", res)


def test_promotion_decisions(registry) -> None:
    registry.set_alias("bot", "prod", 1)
    rev = registry.revision()
    rejected = registry.record_promotion(_decision("rejected"), None, expect=[(1, 100)])
    assert rejected.id and not rejected.moved and rejected.after == rejected.before == [(1, 100)]
    assert registry.resolve("bot:prod").version == 1 and registry.revision() == rev

    canary = registry.record_promotion(_decision("canary", canary_percent=10),
                                       [(1, 90), (2, 10)], expect=[(1, 100)])
    assert canary.after == [(1, 90), (2, 10)] and registry.revision() > rev
    assert registry.aliases("bot")[0].weights == [(1, 90), (2, 10)]

    # the alias moved while the candidate was evaluated: nothing moves, recorded as aborted
    registry.set_alias("bot", "prod", 1)
    aborted = registry.record_promotion(_decision(), [(2, 100)], expect=[(1, 90), (2, 10)])
    assert aborted.outcome == "aborted" and "moved during the evaluation" in aborted.note
    assert registry.resolve("bot:prod").version == 1

    done = registry.record_promotion(_decision(), [(2, 100)], expect=[(1, 100)])
    assert done.before == [(1, 100)] and done.after == [(2, 100)]
    assert registry.resolve("bot:prod").version == 2

    new_alias = registry.record_promotion(_decision(alias="beta", baseline=None), [(2, 100)],
                                          expect=None)
    assert new_alias.before is None and new_alias.after == [(2, 100)]

    got = registry.promotions("bot")
    assert [d.outcome for d in got] == ["promoted", "promoted", "aborted", "canary", "rejected"]
    assert got[-1].rules[0].detail == "0.4 < 0.5" and got[-1].actor == "alice"
    assert got[0].created_at.tzinfo is not None and got[0].id > got[1].id
    assert registry.promotions("bot", limit=2) == got[:2] and registry.promotions("other") == []


def test_show_prints_evals_and_decisions(registry, monkeypatch, capsys) -> None:
    from loraplex.adapters import cli

    registry.record_eval("bot@2", "golden", {"figures": {"pass_rate": 0.8, "n": 5},
                                             "sha256": "cd" * 32, "at": "2025-01-02T03:04:05",
                                             "served_as": "bot@2"})
    registry.set_alias("bot", "prod", 1)
    registry.record_promotion(_decision("rejected"), None, expect=[(1, 100)])
    registry.record_promotion(_decision(), [(2, 100)], expect=[(1, 100)])
    rc = cli.main(["adapters", "show", "bot@2", "--registry-url", registry.url])
    out = capsys.readouterr().out
    assert rc == 0
    assert "golden    pass_rate=0.8, n=5  cdcdcdcdcdcd" in out
    assert "promotions of bot (newest first):" in out
    lines = [ln for ln in out.splitlines() if "alice" in ln]
    assert "promoted" in lines[0] and "1 -> 2" in lines[0]
    assert "rejected" in lines[1] and "1 -> 1" in lines[1]
    assert "g.pass_rate min 0.4 < 0.5" in lines[1]
    rc = cli.main(["adapters", "show", "bot", "--json", "--registry-url", registry.url])
    shown = json.loads(capsys.readouterr().out)
    assert [d["outcome"] for d in shown["promotions"]] == ["promoted", "rejected"]


def test_promote_is_an_adapters_verb(capsys) -> None:
    """Found through the `loraplex.adapters.verbs` entry point (the package is installed)."""
    from loraplex.adapters import cli

    with pytest.raises(SystemExit):
        cli.main(["adapters", "promote", "--help"])
    out = capsys.readouterr().out
    assert "--candidate N" in out and "--gate GATE" in out and "--canary PERCENT" in out


@pytest.mark.parametrize("backend", ["sqlite",
                                     pytest.param("postgres", marks=pytest.mark.postgres)])
def test_registry_at_0001_upgrades(backend: str, request, tmp_path: Path) -> None:
    """A registry made before promotions (schema 0001) opens, upgrades, and keeps its rows."""
    from alembic import command
    from alembic.config import Config

    from loraplex.adapters import sql
    from loraplex.adapters.registry import Registry

    url = (request.getfixturevalue("pg_url") if backend == "postgres"
           else f"sqlite:///{tmp_path / 'old.db'}")
    engine = sql.make_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(sql.MIGRATIONS_DIR))
    with sql.write_tx(engine) as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    engine.dispose()
    old = Registry.__new__(Registry)  # seed rows through the 0001 tables only
    old.engine = sql.make_engine(url)
    _seed_registry(old)
    old.engine.dispose()
    with Registry(url, str(tmp_path / "artifacts")) as reg:
        assert [v.ref for v in reg.list()] == ["bot@1", "bot@2"]
        assert reg.promotions() == []
        reg.set_alias("bot", "prod", 1)
        assert reg.record_promotion(_decision(), [(2, 100)], expect=[(1, 100)]).id == 1


def test_promote_flow_with_a_scripted_server(tmp_path: Path, monkeypatch, capsys) -> None:
    """`adapters promote` end to end but the server: dry run, a refusal, a canary."""
    from loraplex.adapters import cli
    from loraplex.adapters.registry import Registry

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    with Registry(url, str(tmp_path / "artifacts")) as reg:
        _seed_registry(reg, versions=3)
        reg.set_alias("bot", "prod", 1)
    # bot@1 shouts, bot@2 whispers, bot@3 shouts
    client = Scripted(lambda m, q: q[-1]["content"].upper() if m != "bot@2" else "psst")
    monkeypatch.setattr(runner, "_client", lambda settings: client)
    (tmp_path / "shout.jsonl").write_text("".join(
        json.dumps({"prompt": w, "checks": [{"type": "case", "case": "upper"}]}) + "\n"
        for w in ("cat", "dog")))
    gate_path = tmp_path / "gate.yaml"
    gate_path.write_text("sets: [shout.jsonl]\nrules:\n  pass_rate: {min: 0.5, "
                         "max_regression: 0}\n")

    def promote(*argv: str) -> tuple[int, str]:
        rc = cli.main(["adapters", "promote", "bot", "--gate", str(gate_path), "--registry-url",
                       url, "--artifacts-url", str(tmp_path / "artifacts"), "--actor", "bob",
                       "--max-tokens", "5", *argv])
        return rc, capsys.readouterr().out

    rc, out = promote("--candidate", "3", "--dry-run")
    assert rc == 0 and "dry run: the gate passes; bot:prod would be 3" in out
    rc, out = promote("--candidate", "2")
    assert rc == 1 and "rejected: bot:prod stays at 1 (decision #1 by bob)" in out
    assert "shout.pass_rate min" in out and "FAIL (0 < 0.5)" in out
    rc, out = promote("--candidate", "3", "--canary", "25", "--json")
    assert rc == 0 and json.loads(out)["after"] == [[1, 75], [3, 25]]
    assert {c["model"] for c in client.calls} == {"bot@1", "bot@2", "bot@3"}
    assert {c["max_tokens"] for c in client.calls} == {1, 5}  # warm-ups, then the run
    with Registry(url, str(tmp_path / "artifacts")) as reg:
        assert [d.outcome for d in reg.promotions("bot")] == ["canary", "rejected"]
        assert reg.aliases("bot")[0].weights == [(1, 75), (3, 25)]
        assert reg.show("bot@2").metrics["evals"]["shout"]["figures"]["pass_rate"] == 0.0
    rc, out = promote("--candidate", "9")
    assert rc == 2
