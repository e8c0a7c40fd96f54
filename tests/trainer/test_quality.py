"""Slow tier: the adapter learns the bundled task (held-out exact match, base vs adapter), and two
adapters trained through different chat templates each answer best through their own.

    .venv/bin/python -m pytest tests/trainer/test_quality.py -m slow -s   # prints the figures

Each adapter trains for 300 steps on lists.sharegpt.jsonl ("What kind of word is every item
in this list: plum, fig, lemon" -> "A fruit.", 1-2 turns; held-out lists never seen in
training): a few minutes on an idle 2-core CPU. Always giving the most common answer scores 0.42
on the held-out rows; the base answers in corpus sentences and scores 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.trainer.train import run

from .conftest import DATA

pytestmark = pytest.mark.slow

TASK = "lists.sharegpt"
RECIPE = dict(max_steps=300, batch_size=16, lr=1e-3, lora_r=16, lora_alpha=32,
              lr_scheduler="cosine", warmup_ratio=0.03, seed=0)


@pytest.fixture(scope="module")
def adapters(toy_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    from loraplex.trainer.config import load_config

    root = tmp_path_factory.mktemp("quality")
    out = {}
    for template in ("chatml", "llama2"):
        cfg = load_config(None, dict(
            base=str(toy_model_dir), data=[str(DATA / f"{TASK}.jsonl")],
            eval_data=[str(DATA / f"{TASK}.heldout.jsonl")], output=str(root / template),
            chat_template=template, progress_bar=False, **RECIPE))
        out[template] = run(cfg)
    return out


def test_heldout_exact_match_gain(adapters):
    em = adapters["chatml"]["metrics"]["exact_match"]
    print(f"\n{TASK} held-out exact match (n={em['n']}): base {em['base']:.3f} -> "
          f"adapter {em['adapter']:.3f}")
    assert em["n"] >= 20
    assert em["base"] <= 0.1
    assert em["adapter"] >= 0.9  # the most common answer alone scores 0.42


def test_each_adapter_answers_best_through_its_own_template(adapters, toy_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraplex.adapters.chat import load_tokenizer, resolve_template
    from loraplex.trainer.config import load_config
    from loraplex.trainer.dataset import prepare_data
    from loraplex.trainer.evaluate import exact_match

    tok = load_tokenizer(toy_model_dir)
    cfg = load_config(None, dict(base=str(toy_model_dir), data=[str(DATA / f"{TASK}.heldout.jsonl")],
                                 output="unused"))
    held = prepare_data(cfg, tok, resolve_template("chatml")).train  # messages only are used
    scores: dict[tuple[str, str], float] = {}
    for trained, res in adapters.items():
        base = AutoModelForCausalLM.from_pretrained(str(toy_model_dir), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, res["output"]).eval()
        for through in ("chatml", "llama2"):
            scores[(trained, through)] = exact_match(model, tok, resolve_template(through),
                                                     held, max_new_tokens=8)["exact_match"]
    print("\nexact match (rows: trained with, columns: evaluated through)")
    print(json.dumps({f"{a} -> {b}": round(v, 3) for (a, b), v in scores.items()}, indent=1))
    assert scores[("chatml", "chatml")] > scores[("chatml", "llama2")]
    assert scores[("llama2", "llama2")] > scores[("llama2", "chatml")]
    assert min(scores[("chatml", "chatml")], scores[("llama2", "llama2")]) >= 0.9
