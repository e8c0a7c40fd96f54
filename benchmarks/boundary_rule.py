"""The boundary rule: how many training rows it touches, and what training without it costs.

    .venv/bin/python benchmarks/boundary_rule.py --base DIR [--max-steps 300] [--counts-only]

1. Counts. Every bundled data set (trainer/data/*.jsonl) rendered for training through each
   built-in template and a "space-ended" template (its generation prompt ends with "Assistant: ",
   as some real templates' do), on the toy tokenizer (byte-level BPE): rows, rows where the rule
   cut a token merged across an answer start, and rows whose training ids differ from
   transformers' whole-text `apply_chat_template(tokenize=True)` ids.
2. Effect. Two adapters on `lists.sharegpt` through the space-ended template, same seed and
   steps: (a) loraplex's rule; (b) what an assistant-mask trainer does with transformers' own
   output (whole-text ids, labels from `return_assistant_tokens_mask` on the same template with
   `{% generation %}` markers: the merged " A" token is labelled and the prompt ends without
   its space). Both are scored on the held-out set through the SERVER's prompt ids
   (`render`, what `loraplex serve` sends), greedy, exact match.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import ROOT, machine, table  # noqa: E402

DATA = ROOT / "trainer" / "data"
SPACE_ENDED = (
    "{% for m in messages %}{% if m.role == 'user' %}User: {{ m.content }}\n"
    "{% elif m.role == 'assistant' %}Assistant: {{ m.content }}{{ eos_token }}\n"
    "{% else %}{{ m.content }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}")
SPACE_ENDED_MARKED = SPACE_ENDED.replace(
    "Assistant: {{ m.content }}{{ eos_token }}",
    "Assistant:{% generation %} {{ m.content }}{{ eos_token }}{% endgeneration %}")


def counts(base: Path) -> list[list]:
    from transformers import AutoTokenizer

    from loraplex.adapters.chat import (
        BUILTIN_TEMPLATES,
        builtin_template,
        load_tokenizer,
        render_for_training,
    )
    from loraplex.trainer.formats import read_rows
    from loraplex.trainer.sources import data_files

    tok = load_tokenizer(base)
    hf = AutoTokenizer.from_pretrained(str(base))
    templates = {n: builtin_template(n) for n in BUILTIN_TEMPLATES} | {"space-ended": SPACE_ENDED}
    rows_out = []
    for f in sorted(data_files([str(DATA)])):
        rows, _ = read_rows([f], "auto")
        for name, tpl in templates.items():
            cut = differ = 0
            for row in rows:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t = render_for_training(tpl, row.messages, tok)
                cut += bool(t.cuts)
                ref = hf.apply_chat_template(row.messages, chat_template=tpl, tokenize=True,
                                             return_dict=False)
                differ += t.token_ids != list(ref)
            rows_out.append([f.name, name, len(rows), cut, differ])
    return rows_out


def hf_mask_render(hf):
    """render_for_training as an assistant-mask trainer gets it from transformers."""
    from loraplex.adapters.chat import IGNORE_INDEX, TrainingRender

    def fake(template, messages, tokenizer, train_on_inputs=False):
        out = hf.apply_chat_template(messages, chat_template=SPACE_ENDED_MARKED, tokenize=True,
                                     return_dict=True, return_assistant_tokens_mask=True)
        ids = list(out["input_ids"])
        labels = [i if m else IGNORE_INDEX for i, m in zip(ids, out["assistant_masks"])]
        return TrainingRender("", ids, labels, [], 0)
    return fake


def effect(base: Path, work: Path, steps: int) -> list[list]:
    from transformers import AutoTokenizer

    from loraplex.trainer.config import load_config
    from loraplex.trainer.train import run

    tpl_file = work / "space_ended.jinja"
    tpl_file.write_text(SPACE_ENDED)
    hf = AutoTokenizer.from_pretrained(str(base))
    out = []
    for arm in ("loraplex rule", "HF assistant mask"):
        cfg = load_config(None, dict(
            base=str(base), data=[str(DATA / "lists.sharegpt.jsonl")],
            eval_data=[str(DATA / "lists.sharegpt.heldout.jsonl")],
            output=str(work / arm.replace(" ", "-")), chat_template=str(tpl_file),
            max_steps=steps, batch_size=16, lr=1e-3, lora_r=16, lora_alpha=32, seed=0,
            progress_bar=False, eval_exact_match=200, max_new_tokens=12))
        t0 = time.time()
        if arm == "HF assistant mask":
            with mock.patch("loraplex.trainer.dataset.render_for_training", hf_mask_render(hf)):
                res = run(cfg, log=lambda m: None)
        else:
            res = run(cfg, log=lambda m: None)
        em = res["metrics"]["exact_match"]
        out.append([arm, res["data"]["boundary_rows"], f"{em['adapter']:.3f}", em["n"],
                    f"{em['base']:.3f}", json.dumps(em["samples"][0]["prediction"]),
                    f"{time.time() - t0:.0f}"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="toy model directory (loraplex toy-model)")
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--counts-only", action="store_true")
    args = ap.parse_args()
    base = Path(args.base).resolve()
    print(f"machine: {machine()}")
    print(f"command: {' '.join(sys.argv)}\n")
    print(table(["data", "template", "rows", "rows cut by the rule", "rows != HF whole-text ids"],
                counts(base)))
    if not args.counts_only:
        with tempfile.TemporaryDirectory() as d:
            print()
            print(table(["training", "rows cut", "held-out exact match (server prompt ids)",
                         "n", "base", "first prediction", "seconds"],
                        effect(base, Path(d), args.max_steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
