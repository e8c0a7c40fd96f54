"""`loraplex eval` through a real `loraplex serve` reproduces the trainer's held-out exact match.

`loraplex train` ends by answering its held-out rows greedily through transformers + PEFT
(trainer/evaluate.py) and writes the exact match to report.json (`metrics.exact_match.adapter`,
with the first five answers in `samples`). Here an adapter is trained on the bundled words task
(a short run, so that it gets some held-out questions right and some wrong: agreement on both
kinds is what is tested), pushed to the registry of the session's server, and evaluated with
`loraplex eval` on the very same held-out file (an Alpaca file evaluates as it is: each row's
output is its exact-match reference, trimmed on both sides as the trainer trims). Beside the
rate, every one of the 27 answers is compared: the trainer's generate() run again on the saved
adapter (report.json keeps only five sample answers) against the server's.

What differs between the two sides is only the engine: the server renders the prompt with the
adapter's template through the same renderer (adapters/chat.py), and vLLM's CPU engine (float32,
one request per row, batched with whatever else is in flight) computes the logits that
transformers computes in one left-padded batch. Greedy decoding turns the difference in float
rounding into a different answer only where two tokens are within rounding of each other, so
the two may differ on a near tie: the test allows one question of 27 either way. Measured (AMD
EPYC, 2 cores): here 4/27 on both sides with all 27 answers identical; in `make demo`, words@1
14/27 and words@2 13/27 on both sides (docs/trainer.md). Both sides generate at most
16 new tokens; a longer limit changes no verdict, because a matching answer ("An animal.") ends
with its stop token within 4 tokens.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from loraplex.adapters import cli

HELDOUT = Path(__file__).resolve().parents[2] / "trainer" / "data" / "words.alpaca.heldout.jsonl"
WORDS = HELDOUT.with_name("words.alpaca.jsonl")
KEY_ENV = "LORAPLEX_TEST_EVAL_KEY"


@pytest.fixture(scope="module")
def trained(toy_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The trainer's run: 100 steps on words.alpaca (tens of seconds on 2 cores), rank 8 (the
    test server's max_lora_rank)."""
    from loraplex.trainer.config import load_config
    from loraplex.trainer.train import run

    out = tmp_path_factory.mktemp("eval-vs-trainer") / "words"
    cfg = load_config(None, dict(
        base=str(toy_model_dir), data=[str(WORDS)], eval_data=[str(HELDOUT)], output=str(out),
        chat_template="chatml", max_steps=100, eval_steps=100, batch_size=16, lr=1e-3,
        lora_r=8, lora_alpha=16, seed=0, max_new_tokens=16, progress_bar=False))
    run(cfg, log=lambda m: None)
    return {"dir": out, "report": json.loads((out / "report.json").read_text()),
            "answers": trainer_answers(toy_model_dir, out)}


def trainer_answers(base: Path, adapter: Path) -> list[str]:
    """Every held-out answer as the trainer computes them (its own generate(), the adapter's
    saved template): report.json keeps the rate and five samples, this has all 27."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraplex.adapters.chat import load_tokenizer
    from loraplex.trainer.evaluate import generate
    from loraplex.trainer.formats import from_alpaca

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(adapter))
    prompts = [from_alpaca(json.loads(line))[:-1] for line in HELDOUT.read_text().splitlines()]
    template = (adapter / "chat_template.jinja").read_text()
    return generate(model.eval(), load_tokenizer(base), template, prompts, max_new_tokens=16)


@pytest.mark.engine
def test_eval_reproduces_the_trainers_heldout_exact_match(served, trained, tmp_path, capsys,
                                                           monkeypatch):
    monkeypatch.setenv(KEY_ENV, "test-key")
    em = trained["report"]["metrics"]["exact_match"]
    assert em["n"] == 27
    name = f"words-{uuid.uuid4().hex[:8]}"
    served.registry.push(trained["dir"], name, base="toy")

    out = tmp_path / "eval.json"
    # The bare name, right after the push and before the server's next registry poll: eval's
    # GET /v1/models/{id} looks a new name up the way a completion request does.
    rc = cli.main(["eval", name, "--set", f"heldout={HELDOUT}", "--url", served.v1,
                   "--api-key-env", KEY_ENV, "--max-tokens", "16", "--concurrency", "4",
                   "--output", str(out), "--registry-url", served.registry.url])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    (model,) = json.loads(out.read_text())["models"]
    assert model["served_as"] == f"{name}@1"
    figures = model["figures"]["heldout"]
    items = model["items"]["heldout"]
    assert figures["n"] == 27 and figures["errors"] == 0

    trainer_hits = round(em["adapter"] * em["n"])
    eval_hits = sum(i["passed"] for i in items)
    assert figures["exact_match"] == pytest.approx(eval_hits / 27)
    # Not a trivial agreement: the adapter is right on some questions and wrong on others.
    assert 0 < trainer_hits < 27, em
    assert abs(eval_hits - trainer_hits) <= 1, (
        f"trainer {trainer_hits}/27, eval {eval_hits}/27: "
        + json.dumps([(i["id"], i["answer"], i["passed"]) for i in items]))
    # The trainer's stored answers (its first five held-out rows) are the server's answers to
    # the same prompts, word for word, but for a near tie.
    rows = [json.loads(line) for line in HELDOUT.read_text().splitlines()]
    served_answer = {r["instruction"] + (f"\n\n{r['input']}" if r["input"] else ""): i["answer"]
                     for r, i in zip(rows, items)}
    assert len(em["samples"]) == 5
    differ = [(s["prompt"], s["prediction"], served_answer[s["prompt"]]) for s in em["samples"]
              if s["prediction"].strip() != (served_answer[s["prompt"]] or "").strip()]
    assert len(differ) <= 1, differ
    # All 27 answers, the trainer's generate() beside the server's: the same but for a near tie.
    refs = [r["output"] for r in rows]
    assert sum(a.strip() == ref for a, ref in zip(trained["answers"], refs)) == trainer_hits
    apart = [(rows[k]["instruction"], rows[k]["input"], a, items[k]["answer"])
             for k, a in enumerate(trained["answers"])
             if a.strip() != (items[k]["answer"] or "").strip()]
    assert len(apart) <= 1, apart
    print(f"\nheld-out exact match: trainer {trainer_hits}/27 (transformers + PEFT), "
          f"eval {eval_hits}/27 (loraplex serve); answers differing: {len(apart)}/27")
