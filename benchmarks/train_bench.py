"""`loraplex train` vs TRL's SFTTrainer: tokens/s and peak RSS, same model, data and LoRA config.

    .venv/bin/python benchmarks/train_bench.py --base /work/toy-model [--steps 60] [--repeats 2]

Each side runs in its own subprocess (so peak RSS is that side's alone), the sides alternate
(A B A B ...) so a busy shared machine slows both alike, and the median of the repeats is reported.

Same for both: the toy base, the bundled words.alpaca.jsonl rendered with the base's ChatML
template, loss on the assistant tokens only (TRL: prompt/completion rows, completion-only loss),
LoRA r=16, alpha=32, dropout 0, all linear layers, batch 16, no accumulation, AdamW at lr 1e-3
with a cosine schedule, fp32 on the CPU, no eval and no checkpoints during the measured steps.
Throughput = non-pad tokens fed to the model / wall time of the training loop (model load and
data preparation excluded on both sides); peak RSS = the subprocess's ru_maxrss at exit
(model load, data preparation, training and saving the adapter included).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402  (standard library only: the workers' RSS is not affected)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "trainer" / "data" / "words.alpaca.jsonl"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
BATCH, LR, MAX_LEN = 16, 1e-3, 256


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_loraplex(base: str, steps: int, out: str) -> dict:
    from loraplex.trainer.config import load_config
    from loraplex.trainer.train import Callback, run

    class Clock(Callback):
        def on_begin(self, t):
            self.t0 = time.perf_counter()

        def on_end(self, t):
            self.seconds = time.perf_counter() - self.t0
            self.tokens = t.state.tokens

    clock = Clock()
    cfg = load_config(None, dict(
        base=base, data=[str(DATA)], output=out, max_steps=steps, batch_size=BATCH, lr=LR,
        lora_r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
        max_seq_len=MAX_LEN, warmup_ratio=0.0, progress_bar=False, eval_exact_match=0, seed=0))
    res = run(cfg, callbacks=[clock], log=lambda m: None)
    return {"tokens": clock.tokens, "seconds": clock.seconds,
            "final_loss": res["metrics"]["train_loss"]}


def worker_trl(base: str, steps: int, out: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = []
    for line in DATA.read_text().splitlines():
        r = json.loads(line)
        user = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        rows.append({"prompt": [{"role": "user", "content": user}],
                     "completion": [{"role": "assistant", "content": r["output"]}]})
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            self.seconds = time.perf_counter() - self.t0

    clock = Clock()
    args = SFTConfig(
        output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="cosine",
        warmup_steps=0, max_length=MAX_LEN, completion_only_loss=True, use_cpu=True,
        save_strategy="no", eval_strategy="no", logging_steps=max(1, steps // 4),  # (divides)
        report_to="none", seed=0, dataloader_num_workers=0, disable_tqdm=True, bf16=False,
        fp16=False)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                               lora_dropout=LORA["dropout"], target_modules="all-linear",
                               task_type="CAUSAL_LM"),
        callbacks=[clock])
    trainer.train()
    trainer.save_model(out)
    logs = trainer.state.log_history
    losses = [float(h["loss"]) for h in logs if "loss" in h]
    # TRL's own count of the non-pad tokens trained on (logged at the last step too).
    tokens = max(int(float(h["num_tokens"])) for h in logs if "num_tokens" in h)
    return {"tokens": tokens, "seconds": clock.seconds, "final_loss": losses[-1]}


def run_worker(side: str, base: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-{side}-") as tmp:
        proc = subprocess.run([sys.executable, __file__, "--worker", side, "--base", base,
                               "--steps", str(steps), "--out", str(Path(tmp) / "out")],
                              capture_output=True, text=True, env={**os.environ,
                                                                   "HF_HUB_OFFLINE": "1",
                                                                   "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise SystemExit(f"{side} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--steps", type=int, default=60, help="a multiple of 4")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker", choices=["loraplex", "trl"])
    ap.add_argument("--out")
    ap.add_argument("--json", help="also write the results to this file")
    a = ap.parse_args()
    if a.worker:
        fn = worker_loraplex if a.worker == "loraplex" else worker_trl
        res = fn(a.base, a.steps, a.out)
        res["peak_rss_mb"] = round(peak_rss_mb(), 1)
        res["tokens_per_s"] = round(res["tokens"] / res["seconds"], 1)
        print(json.dumps(res))
        return

    import torch
    import transformers
    import trl

    env = (f"{loadgen.machine()}; torch {torch.__version__} ({torch.get_num_threads()} threads), "
           f"transformers {transformers.__version__}, trl {trl.__version__}")
    runs: dict[str, list[dict]] = {"loraplex": [], "trl": []}
    for i in range(a.repeats):
        for side in ("loraplex", "trl") if i % 2 == 0 else ("trl", "loraplex"):
            r = run_worker(side, a.base, a.steps)
            runs[side].append(r)
            print(f"  run {i + 1} {side:8s}: {r['tokens_per_s']:8.1f} tokens/s, "
                  f"peak RSS {r['peak_rss_mb']:7.1f} MB, final loss {r['final_loss']:.3f}",
                  file=sys.stderr, flush=True)
    med = {s: {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
               "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
               "tokens": rs[0]["tokens"]} for s, rs in runs.items()}
    ratio_tps = med["loraplex"]["tokens_per_s"] / med["trl"]["tokens_per_s"]
    ratio_rss = med["loraplex"]["peak_rss_mb"] / med["trl"]["peak_rss_mb"]
    cmd = f"python benchmarks/train_bench.py --base {a.base} --steps {a.steps} --repeats {a.repeats}"
    print(f"\nmachine: {env}\ncommand: {cmd}\n")
    print("| trainer | tokens/s (median) | peak RSS MB (median) | tokens per run |")
    print("|---|---:|---:|---:|")
    for side, name in (("loraplex", "loraplex train"), ("trl", f"TRL SFTTrainer {trl.__version__}")):
        m = med[side]
        print(f"| {name} | {m['tokens_per_s']:.0f} | {m['peak_rss_mb']:.0f} | {m['tokens']} |")
    print(f"| ratio loraplex/TRL | {ratio_tps:.2f}x | {ratio_rss:.2f}x | |")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": env, "command": cmd, "runs": runs,
                                            "median": med, "ratio_tokens_per_s": ratio_tps,
                                            "ratio_peak_rss": ratio_rss}, indent=2))


if __name__ == "__main__":
    main()
