"""`loraplex train` beside TRL's SFTTrainer on a ~0.9B Llama, on one NVIDIA GPU: tokens/s, peak memory.

    python benchmarks/gpu_train_check.py [--steps 200] [--repeats 1] [--json results.json]
    python benchmarks/gpu_train_check.py --device cpu --size tiny --steps 8     # CPU smoke test

benchmarks/gpu_train_check.sh wraps it for a bare GPU machine (installs the checkout and any
wheels you bring, then runs this with the defaults below and writes the results to a file).

What it does, all offline:
1. builds the base into --work-dir (reused when the spec matches): a Llama-architecture model with
   random, seeded weights (--size 1b: hidden 2048, 16 layers, MLP 5632, 16 heads, 8 KV heads,
   vocab 32000, untied head: 0.89B parameters; --size tiny: hidden 256, 4 layers, vocab 8192), saved as bf16
   safetensors, with the toy's tokenizer recipe (trainer/toy.py: byte-level BPE trained on the
   bundled corpus, asked for 4096 tokens: the corpus gives about 1,300, so the model's vocab is
   larger than the tokenizer's) and ChatML;
2. writes the data (--data synthetic, the default): single-turn conversations made of bundled-corpus
   paragraphs ("Continue this text." + 1-6 paragraphs -> 1-4 paragraphs), seeded, deduplicated,
   each at most --max-seq-len tokens after rendering (about 100-700, a few hundred on average);
   or --data words: the bundled words.alpaca.jsonl (22-31 tokens a row, what train_bench.py uses);
3. for each config, runs `loraplex train` (loraplex.trainer.train.run in-process, a Callback as the
   clock) and TRL's SFTTrainer, each side in its own subprocess, sides alternating (A B, then B A):
     gc      bf16 (fp32 on cpu) + gradient checkpointing, padded length-grouped batches
     qlora4  --quantize 4bit: bitsandbytes NF4, double quantization, bf16 compute, base prepared by
             PEFT's prepare_model_for_kbit_training; gradient checkpointing (cuda only)
     packing --packing, bf16 + gradient checkpointing, flash_attention_2 when flash-attn is
             installed (else sdpa); TRL: SFTConfig(packing=True, padding_free=True) (BFD packing)
   Same on both sides: base, rows (TRL: prompt/completion with completion_only_loss), LoRA r 16,
   alpha 32, dropout 0, all linear layers, batch, AdamW lr 2e-4 cosine without warmup, steps,
   precision, gradient checkpointing (non-reentrant), quantization, attention, seed 0.
   Packing: loraplex packs each micro-batch of --batch-size rows into one row; TRL packs the whole
   set best-fit into rows of max_length tokens, so TRL gets one row per step with max_length =
   batch x mean row length (about the same tokens per step; the table shows both).

Reported per run: tokens/s = non-pad tokens fed to the model / wall time of the training loop
(model load, data preparation and saving excluded, CUDA synchronized at both ends); peak GPU
memory = torch.cuda.max_memory_allocated over the whole subprocess (model load included, so
QLoRA's saving shows), and the loop's own peak (reset when the loop starts); on cpu the
subprocess's peak RSS instead; loss = the mean training loss of the last tenth of the steps.
Medians over --repeats, ratios loraplex / TRL, a markdown table on stdout and --json.
A missing package (trl, bitsandbytes, flash-attn) or a config this device cannot run (QLoRA on
cpu) skips that config for that side with a line saying why; a side that fails is reported with
the end of its log, and the others still run. Exit status 1 when any run failed, else 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORDS = ROOT / "trainer" / "data" / "words.alpaca.jsonl"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
SIZES = {
    # ~0.89B: 16 x (12.6M attention + 34.6M MLP) + 2 x 65.5M embeddings / head
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5632,
               num_attention_heads=16, num_key_value_heads=8, vocab_size=32000),
    # 4 layers: with fewer than 20 target modules PEFT saves full module paths in
    # adapter_config.json, which the registry's validation (adapters/validate.py) rejects.
    "tiny": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=688,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=8192),
}
TOKENIZER_VOCAB = 4096
CONFIGS = ("gc", "qlora4", "packing")
SIDES = ("loraplex", "trl")


# -- environment ---------------------------------------------------------------------------------

def has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def pkg_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def machine(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "host": f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
                f"{os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "versions": {p: pkg_version(p) for p in (
            "torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes",
            "flash-attn", "loraplex")},
    }
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB"
        info["cuda"] = torch.version.cuda
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            info["driver"] = "unknown (nvidia-smi not available)"
    else:
        info["gpu"] = "none (cpu)"
        info["torch_threads"] = torch.get_num_threads()
    return info


# -- the base and the data -----------------------------------------------------------------------

def build_base(work: Path, size: str, seed: int, device: str, log) -> Path:
    """A random-init Llama (seeded) with the toy's tokenizer recipe and ChatML, in bf16."""
    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    from loraplex.trainer.toy import chatml_template, corpus_text, train_tokenizer

    spec = {"size": size, **SIZES[size], "tokenizer_vocab": TOKENIZER_VOCAB, "seed": seed,
            "dtype": "bfloat16"}
    out = work / f"base-{size}"
    marker = out / "gpu_train_check.json"
    if marker.is_file() and json.loads(marker.read_text()).get("spec") == spec:
        log(f"base: reusing {out}")
        return out
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(corpus_text(), TOKENIZER_VOCAB),
        bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<pad>",
        model_max_length=4096)
    tokenizer.chat_template = chatml_template()
    s = SIZES[size]
    config = LlamaConfig(
        vocab_size=max(s["vocab_size"], len(tokenizer)), hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"], max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it will train: seconds on a GPU
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the workers are separate processes: hand the memory back
    marker.write_text(json.dumps({"spec": spec, "parameters": n_params}, indent=2))
    log(f"base: {n_params / 1e6:.0f}M parameters, tokenizer {len(tokenizer)} tokens, written to "
        f"{out} in {time.time() - t0:.0f}s")
    return out


def build_data(work: Path, base: Path, kind: str, rows: int, max_len: int, seed: int,
               log) -> tuple[Path, dict[str, Any]]:
    """OpenAI-messages JSONL (single turn) + its length stats in the base's rendering."""
    from transformers import AutoTokenizer

    from loraplex.trainer.toy import corpus_text

    tok = AutoTokenizer.from_pretrained(str(base))
    convs: list[list[dict[str, str]]] = []
    if kind == "words":
        for line in WORDS.read_text().splitlines():
            r = json.loads(line)
            user = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
            convs.append([{"role": "user", "content": user},
                          {"role": "assistant", "content": r["output"]}])
    else:
        # Plain paragraphs only: the corpus's chat snippets hold special-token text, which the
        # trainer rightly rejects.
        paras = [p.strip().replace("\n", " ") for p in corpus_text().split("\n\n")
                 if p.strip() and "<" not in p]
        rng = random.Random(seed)
        seen: set[str] = set()
        tries = 0
        while len(convs) < rows and tries < rows * 20:
            tries += 1
            prompt = "Continue this text.\n\n" + " ".join(
                rng.choice(paras) for _ in range(rng.randint(1, 6)))
            answer = " ".join(rng.choice(paras) for _ in range(rng.randint(1, 4)))
            if prompt + answer in seen:
                continue
            conv = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": answer}]
            text = tok.apply_chat_template(conv, tokenize=False)
            if len(tok(text, add_special_tokens=False)["input_ids"]) <= max_len:
                seen.add(prompt + answer)
                convs.append(conv)
    lengths = [len(tok(tok.apply_chat_template(c, tokenize=False),
                       add_special_tokens=False)["input_ids"]) for c in convs]
    path = work / f"data-{kind}-{len(convs)}-{max_len}-{seed}-{base.name}.jsonl"
    with open(path, "w") as f:
        for c in convs:
            f.write(json.dumps({"messages": c}) + "\n")
    stats = {"kind": kind, "rows": len(convs), "mean_tokens": round(statistics.mean(lengths), 1),
             "min_tokens": min(lengths), "max_tokens": max(lengths), "path": str(path)}
    log(f"data: {len(convs)} rows ({kind}), {stats['min_tokens']}-{stats['max_tokens']} tokens, "
        f"mean {stats['mean_tokens']}, in {path}")
    return path, stats


# -- the two sides (each in its own subprocess) --------------------------------------------------

class Meter:
    """Wall clock and peak memory around a training loop (CUDA synchronized at both ends)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.load_peak = 0

    def begin(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.load_peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()

    def end(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
        self.loop_peak = torch.cuda.max_memory_allocated() if self.cuda else 0

    def result(self) -> dict[str, Any]:
        import torch

        res: dict[str, Any] = {"seconds": self.seconds,
                               "peak_rss_mb": round(resource.getrusage(
                                   resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        if self.cuda:
            total = max(self.load_peak, torch.cuda.max_memory_allocated())
            res.update(peak_gpu_mb=round(total / 2**20, 1),
                       loop_peak_gpu_mb=round(self.loop_peak / 2**20, 1),
                       peak_reserved_mb=round(torch.cuda.max_memory_reserved() / 2**20, 1))
        return res


def worker_loraplex(job: dict[str, Any]) -> dict[str, Any]:
    from loraplex.trainer.config import load_config
    from loraplex.trainer.train import Callback, run

    meter = Meter(job["device"] == "cuda")

    class Clock(Callback):
        def on_begin(self, t):
            meter.begin()

        def on_end(self, t):
            meter.end()
            self.tokens, self.losses = t.state.tokens, [x for _, x in t.state.train_loss]
            self.steps = t.state.step

    clock = Clock()
    cfg = load_config(None, dict(
        base=job["base"], data=[job["data"]], output=job["out"], max_steps=job["steps"],
        batch_size=job["batch"], lr=job["lr"], lora_r=LORA["r"], lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"], max_seq_len=job["max_len"], warmup_ratio=0.0,
        progress_bar=False, eval_exact_match=0, seed=0, device=job["device"],
        precision=job["precision"], gradient_checkpointing=job["gc"], quantize=job["quantize"],
        attn_implementation=job["attn"], packing=job["packing"]))
    run(cfg, callbacks=[clock], log=lambda m: print(m, file=sys.stderr, flush=True))
    k = job["loss_window"]
    return {"tokens": clock.tokens, "steps": clock.steps, "rows_per_step": job["batch"],
            "final_loss": statistics.mean(clock.losses[-k:]), **meter.result()}


def worker_trl(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    cuda = job["device"] == "cuda"
    meter = Meter(cuda)
    rows = []
    for line in Path(job["data"]).read_text().splitlines():
        msgs = json.loads(line)["messages"]
        rows.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
    tokenizer = AutoTokenizer.from_pretrained(job["base"])
    bf16 = job["precision"] == "bf16"
    dtype = torch.bfloat16 if (cuda and bf16) else torch.float32  # as loraplex: fp32 base on cpu
    ckpt = {"use_reentrant": False}
    if job["quantize"] == "4bit":
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(
            job["base"], dtype=dtype, quantization_config=quant,
            device_map={"": torch.cuda.current_device()}, attn_implementation=job["attn"])
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=job["gc"], gradient_checkpointing_kwargs=ckpt)
    else:
        model = AutoModelForCausalLM.from_pretrained(job["base"], dtype=dtype,
                                                     attn_implementation=job["attn"])
        model = model.to(job["device"])

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            meter.begin()

        def on_train_end(self, args, state, control, **kw):
            meter.end()

    packing = job["packing"]
    if packing:  # one packed row per step of about the tokens of loraplex's packed micro-batch
        per_device, max_length = 1, job["trl_pack_length"]
    else:
        per_device, max_length = job["batch"], job["max_len"]
    args = SFTConfig(
        output_dir=job["out"], max_steps=job["steps"], per_device_train_batch_size=per_device,
        gradient_accumulation_steps=1, learning_rate=job["lr"], lr_scheduler_type="cosine",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, max_length=max_length,
        completion_only_loss=True, packing=packing, padding_free=packing,
        use_cpu=not cuda, bf16=bf16, fp16=False, gradient_checkpointing=job["gc"],
        gradient_checkpointing_kwargs=ckpt if job["gc"] else None, save_strategy="no",
        eval_strategy="no", logging_steps=job["loss_window"], report_to="none", seed=0,
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                               lora_dropout=LORA["dropout"], target_modules="all-linear",
                               task_type="CAUSAL_LM"),
        callbacks=[Clock()])
    trainer.train()
    trainer.save_model(job["out"])
    logs = trainer.state.log_history
    losses = [float(h["loss"]) for h in logs if "loss" in h]
    # TRL's own count of non-pad tokens fed to the model (attention mask, or the packed length).
    tokens = getattr(trainer, "_total_train_tokens", None)
    if not tokens:
        tokens = max(int(float(h["num_tokens"])) for h in logs if "num_tokens" in h)
    return {"tokens": int(tokens), "steps": trainer.state.global_step,
            "rows_per_step": per_device, "final_loss": losses[-1], "optim": str(args.optim),
            **meter.result()}


def requirements(side: str, config: str, device: str) -> str | None:
    """Why this side cannot run this config here, or None."""
    if config == "qlora4":
        if device != "cuda":
            return "QLoRA needs a CUDA GPU (bitsandbytes); skipped on cpu"
        if not has("bitsandbytes"):
            return "bitsandbytes is not installed (pip install bitsandbytes)"
    if side == "trl":
        missing = [m for m in ("trl", "datasets") if not has(m)]
        if missing:
            return f"{' and '.join(missing)} not installed (pip install trl)"
    elif not has("loraplex.trainer.train"):
        return "loraplex is not installed (pip install --no-deps -e .)"
    return None


def run_worker(side: str, job: dict[str, Any], timeout: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"gpucheck-{side}-") as tmp:
        job = {**job, "out": str(Path(tmp) / "out")}
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        try:
            proc = subprocess.run([sys.executable, __file__, "--worker", side,
                                   "--job", str(Path(tmp) / "job.json")],
                                  capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            tail = (exc.stderr or b"")[-1500:]
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            return {"status": "failed", "error": f"timed out after {timeout}s\n{tail}"}
    if proc.returncode != 0:
        return {"status": "failed",
                "error": f"exit {proc.returncode}\n" + proc.stderr[-3000:].strip()}
    try:
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"status": "failed", "error": "no result line\n" + proc.stderr[-3000:].strip()}
    res["tokens_per_s"] = round(res["tokens"] / res["seconds"], 1)
    res["tokens_per_step"] = round(res["tokens"] / max(res["steps"], 1), 1)
    res["status"] = "ok"
    return res


# -- the check -----------------------------------------------------------------------------------

def config_job(name: str, a: argparse.Namespace, base: Path, data: Path,
               stats: dict[str, Any]) -> dict[str, Any]:
    gpu = a.device == "cuda"
    precision = a.precision or ("bf16" if gpu else "fp32")
    attn = "sdpa"
    if name == "packing" and gpu and has("flash_attn") and precision != "fp32":
        attn = "flash_attention_2"
    k = max(d for d in range(1, max(1, a.steps // 10) + 1) if a.steps % d == 0)
    return {"config": name, "base": str(base), "data": str(data), "device": a.device,
            "steps": a.steps, "batch": a.batch_size, "lr": a.lr, "max_len": a.max_seq_len,
            "precision": precision, "gc": True, "quantize": "4bit" if name == "qlora4" else "none",
            "attn": attn, "packing": name == "packing", "loss_window": k,
            "trl_pack_length": max(a.max_seq_len, round(a.batch_size * stats["mean_tokens"]))}


def fmt(x: Any, spec: str = ".0f") -> str:
    return "–" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None,
                    help="default: cuda when available, else cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default=None,
                    help="base size (default: 1b on cuda, tiny on cpu)")
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=1, help="rounds per config (sides alternate)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 16 on cuda, 4 on cpu")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                    help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--data", choices=["synthetic", "words"], default="synthetic")
    ap.add_argument("--rows", type=int, default=4000, help="synthetic rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "loraplex-gpu-check"))
    ap.add_argument("--worker-timeout", type=int, default=1800, help="seconds per run")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.worker:
        job = json.loads(Path(a.job).read_text())
        res = (worker_loraplex if a.worker == "loraplex" else worker_trl)(job)
        print(json.dumps(res))
        return

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    import torch

    cuda = torch.cuda.is_available()
    a.device = a.device or ("cuda" if cuda else "cpu")
    if a.device == "cuda" and not cuda:
        raise SystemExit(f"--device cuda: torch {torch.__version__} sees no CUDA GPU")
    a.size = a.size or ("1b" if a.device == "cuda" else "tiny")
    a.batch_size = a.batch_size or (16 if a.device == "cuda" else 4)
    if not has("loraplex.trainer.toy"):
        raise SystemExit("loraplex is not importable: install the checkout first "
                         "(pip install --no-deps -e .; benchmarks/gpu_train_check.sh does it)")
    cmd = shlex.join(["python", "benchmarks/gpu_train_check.py", *sys.argv[1:]])
    env = machine(a.device)
    log(f"machine: {json.dumps(env)}\ncommand: {cmd}")
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    base = build_base(work, a.size, a.seed, a.device, log)
    data, stats = build_data(work, base, a.data, a.rows, a.max_seq_len, a.seed, log)

    results: dict[str, Any] = {}
    any_failed = False
    for ci, name in enumerate(a.configs):
        job = config_job(name, a, base, data, stats)
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SIDES}
        skipped = {s: requirements(s, name, a.device) for s in SIDES}
        for s, why in skipped.items():
            if why:
                log(f"[{name}] {s}: SKIPPED: {why}")
        for i in range(a.repeats):
            order = SIDES if (ci + i) % 2 == 0 else SIDES[::-1]
            for side in order:
                if skipped[side]:
                    continue
                log(f"[{name}] round {i + 1} {side}: running ({job['steps']} steps, "
                    f"{job['precision']}, attention {job['attn']}) ...")
                r = run_worker(side, job, a.worker_timeout)
                runs[side].append(r)
                if r["status"] != "ok":
                    any_failed = True
                    log(f"[{name}] round {i + 1} {side}: FAILED: {r['error']}")
                    continue
                log(f"[{name}] round {i + 1} {side}: {r['tokens_per_s']:.0f} tokens/s, "
                    + (f"peak GPU {r['peak_gpu_mb']:.0f} MB (loop {r['loop_peak_gpu_mb']:.0f}), "
                       if "peak_gpu_mb" in r else f"peak RSS {r['peak_rss_mb']:.0f} MB, ")
                    + f"loss {r['final_loss']:.3f}, {r['tokens_per_step']:.0f} tokens/step")
        med: dict[str, Any] = {}
        for side in SIDES:
            ok = [r for r in runs[side] if r["status"] == "ok"]
            if not ok:
                med[side] = None
                continue
            keys = ["tokens_per_s", "peak_gpu_mb", "loop_peak_gpu_mb", "peak_rss_mb",
                    "final_loss", "tokens_per_step"]
            med[side] = {k: statistics.median(r[k] for r in ok) for k in keys if k in ok[0]}
            med[side]["rows_per_step"] = ok[0]["rows_per_step"]
        mem_key = "peak_gpu_mb" if a.device == "cuda" else "peak_rss_mb"
        ratio = None
        if med["loraplex"] and med["trl"]:
            ratio = {"tokens_per_s": med["loraplex"]["tokens_per_s"] / med["trl"]["tokens_per_s"],
                     "peak_memory": med["loraplex"][mem_key] / med["trl"][mem_key]}
            if a.device == "cuda":
                ratio["loop_peak_memory"] = (med["loraplex"]["loop_peak_gpu_mb"]
                                             / med["trl"]["loop_peak_gpu_mb"])
        results[name] = {"job": {k: v for k, v in job.items() if k not in ("base", "data")},
                         "skipped": skipped, "runs": runs, "median": med, "ratio": ratio}

    # -- report
    gpu = a.device == "cuda"
    print(f"\nmachine: {env['gpu']}" + (f", driver {env['driver']}, CUDA {env['cuda']}" if gpu
                                        else f", {env['host']}, {env.get('torch_threads')} threads")
          + f"; {', '.join(f'{k} {v}' for k, v in env['versions'].items())}; {env['date']}")
    print(f"command: {cmd}")
    print(f"base: {base} ({a.size}); data: {stats['rows']} {stats['kind']} rows, "
          f"{stats['min_tokens']}-{stats['max_tokens']} tokens (mean {stats['mean_tokens']}); "
          f"{a.steps} steps, batch {a.batch_size}, lr {a.lr}, LoRA r {LORA['r']} alpha "
          f"{LORA['alpha']} all-linear, {a.repeats} round(s), medians\n")
    mem_head = ("peak GPU MB (with load) | loop peak GPU MB" if gpu else "peak RSS MB")
    window = config_job(a.configs[0], a, base, data, stats)["loss_window"] if a.configs else 1
    print(f"| config | trainer | precision, attention | rows/step | tokens/step | tokens/s | "
          f"{mem_head} | loss (mean of last {window} steps) |")
    print("|---|---|---|---:|---:|---:|" + ("---:|---:|" if gpu else "---:|") + "---:|")
    for name in a.configs:
        res = results[name]
        job = res["job"]
        desc = (f"{job['precision']}{' + GC' if job['gc'] else ''}"
                f"{' + NF4' if job['quantize'] == '4bit' else ''}, {job['attn']}")
        for side in SIDES:
            label = "loraplex train" if side == "loraplex" else f"TRL SFTTrainer {env['versions']['trl']}"
            m = res["median"][side]
            if m is None:
                why = res["skipped"][side] or "failed (see log / JSON)"
                print(f"| {name} | {label} | {desc} | | | {why} |" + (" | |" if gpu else " |")
                      + " |")
                continue
            mem = (f"{fmt(m.get('peak_gpu_mb'))} | {fmt(m.get('loop_peak_gpu_mb'))}" if gpu
                   else fmt(m.get("peak_rss_mb")))
            print(f"| {name} | {label} | {desc} | {m['rows_per_step']} | "
                  f"{fmt(m['tokens_per_step'])} | {fmt(m['tokens_per_s'])} | {mem} | "
                  f"{fmt(m['final_loss'], '.3f')} |")
        if res["ratio"]:
            r = res["ratio"]
            mem = (f"{r['peak_memory']:.2f}x | {r['loop_peak_memory']:.2f}x" if gpu
                   else f"{r['peak_memory']:.2f}x")
            print(f"| {name} | ratio loraplex/TRL | | | | **{r['tokens_per_s']:.2f}x** | "
                  f"{mem} | |")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": env, "command": cmd, "data": stats,
                                            "size": a.size, "results": results}, indent=2))
        print(f"\nresults: {a.json}")
    sys.exit(1 if any_failed else 0)


if __name__ == "__main__":
    main()
