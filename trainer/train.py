"""The training run: data -> PEFT LoRA on the base -> a small explicit loop -> adapter directory.

    result = run(cfg)        # what `loraplex train` calls; returns the report dict

Why a hand-written loop rather than transformers' Trainer or TRL: on a CPU the per-step overhead
of those (accelerate wrappers, dataset conversions, callbacks by the dozen) is a visible share of a
step of a small model, and the parts this product needs are few and easier to trust when they are
on one page: token-weighted loss over gradient accumulation, an LR schedule, exact resume
(optimizer, scheduler, RNG and the position inside the epoch's deterministic batch order), eval,
early stopping, checkpoints. benchmarks/train_bench.py compares it with TRL's SFTTrainer.

Loss: cross-entropy summed over labelled tokens and divided by the labelled tokens of the whole
optimizer step (not averaged per micro-batch), so accumulation and batch composition do not change
what a token weighs.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraplex.adapters.chat import (
    ChatTokenizer,
    load_tokenizer,
    render,
    resolve_template,
    template_label,
)
from loraplex.adapters.errors import ConfigError
from loraplex.trainer import output
from loraplex.trainer.config import TrainConfig
from loraplex.trainer.dataset import Example, batch_order, collate, inspect_lines, prepare_data

# Options that must match for --resume to continue a run (the rest may change between attempts).
RESUME_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "lr",
               "lr_scheduler", "warmup_ratio", "weight_decay", "batch_size", "grad_accum", "seed",
               "epochs", "max_steps", "packing", "train_on_inputs", "max_seq_len", "chat_template")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# -- loop state and callbacks --------------------------------------------------------------------

@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_pos: int = 0  # micro-batches of `epoch` already consumed
    total_steps: int = 0
    tokens: int = 0
    train_time_s: float = 0.0
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)
    best_eval: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    should_stop: bool = False
    stopped_early: bool = False


class Callback:
    """Hooks of the loop; each receives the trainer (state, model, optimizer)."""

    def on_begin(self, t: LoraTrainer) -> None: ...
    def on_step(self, t: LoraTrainer, logs: dict[str, Any]) -> None: ...
    def on_eval(self, t: LoraTrainer, eval_loss: float) -> None: ...
    def on_end(self, t: LoraTrainer) -> None: ...


class ProgressBar(Callback):
    def on_begin(self, t: LoraTrainer) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=t.state.total_steps, initial=t.state.step, unit="step",
                        desc="train", file=sys.stderr, dynamic_ncols=True)

    def on_step(self, t: LoraTrainer, logs: dict[str, Any]) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{logs['loss']:.3f}", lr=f"{logs['lr']:.1e}", refresh=False)

    def on_end(self, t: LoraTrainer) -> None:
        self.bar.close()


class JsonlLog(Callback):
    """progress.jsonl: a line every `every` steps (step, loss, lr, tokens/s, ETA) and per eval."""

    def __init__(self, path: Path, every: int):
        self.path, self.every = path, every
        self.window: list[dict[str, Any]] = []

    def _write(self, rec: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def on_step(self, t: LoraTrainer, logs: dict[str, Any]) -> None:
        self.window.append(logs)
        s = t.state
        if s.step % self.every and s.step != s.total_steps:
            return
        secs = sum(w["seconds"] for w in self.window)
        per_step = secs / len(self.window)
        self._write({
            "event": "train", "step": s.step, "epoch": round(s.epoch + t.epoch_fraction(), 4),
            "loss": round(sum(w["loss"] for w in self.window) / len(self.window), 5),
            "lr": logs["lr"], "tokens_per_s": round(sum(w["tokens"] for w in self.window)
                                                    / max(secs, 1e-9), 1),
            "eta_s": round(per_step * (s.total_steps - s.step), 1),
            "elapsed_s": round(s.train_time_s, 2)})
        self.window = []

    def on_eval(self, t: LoraTrainer, eval_loss: float) -> None:
        self._write({"event": "eval", "step": t.state.step, "eval_loss": round(eval_loss, 5)})


class EarlyStopping(Callback):
    """Stop after `patience` evals without an improvement of `min_delta`; keep the best weights."""

    def __init__(self, patience: int, min_delta: float):
        self.patience, self.min_delta = patience, min_delta

    def on_eval(self, t: LoraTrainer, eval_loss: float) -> None:
        s = t.state
        if s.best_eval is None or eval_loss < s.best_eval - self.min_delta:
            s.best_eval, s.best_step, s.evals_without_improvement = eval_loss, s.step, 0
            t.best_weights = {k: v.detach().clone() for k, v in t.trainable().items()}
        else:
            s.evals_without_improvement += 1
            if s.evals_without_improvement >= self.patience:
                s.should_stop = s.stopped_early = True

    def on_end(self, t: LoraTrainer) -> None:
        if t.best_weights is not None and t.state.best_step != t.state.step:
            t.load_trainable(t.best_weights)


class Checkpointer(Callback):
    def __init__(self, every: int | None):
        self.every = every

    def on_step(self, t: LoraTrainer, logs: dict[str, Any]) -> None:
        if self.every and t.state.step % self.every == 0 and t.state.step < t.state.total_steps:
            t.save_checkpoint()


# -- the trainer ---------------------------------------------------------------------------------

class LoraTrainer:
    def __init__(self, cfg: TrainConfig, model: Any, train: list[Example], eval: list[Example],
                 pad_id: int, run_dir: Path, meta: dict[str, Any],
                 callbacks: list[Callback] | None = None):
        import torch

        self.cfg, self.model, self.train_set, self.eval_set = cfg, model, train, eval
        self.pad_id, self.run_dir, self.meta = pad_id, run_dir, meta
        self.callbacks = callbacks or []
        self.lengths = [len(ex.input_ids) for ex in train]
        self.batches_per_epoch = math.ceil(len(train) / cfg.batch_size)
        steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accum)
        total = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
        self.state = LoopState(total_steps=total)
        self.best_weights: dict[str, Any] | None = None
        self.start_step = 0
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = round(cfg.warmup_ratio * total)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: _lr_factor(
            s, warmup, total, cfg.lr_scheduler))

    # -- weights
    def trainable(self) -> dict[str, Any]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def load_trainable(self, weights: dict[str, Any]) -> None:
        import torch

        with torch.no_grad():
            for n, p in self.trainable().items():
                p.copy_(weights[n])

    def epoch_fraction(self) -> float:
        return self.state.batch_pos / max(1, self.batches_per_epoch)

    # -- loss
    def _loss_sum(self, batch: dict[str, Any]) -> tuple[Any, int]:
        import torch.nn.functional as F

        labels = batch.pop("labels")
        logits = self.model(**batch).logits
        target = labels[:, 1:]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                               target.reshape(-1), ignore_index=-100, reduction="sum")
        return loss, int((target != -100).sum())

    def evaluate(self) -> float:
        import torch

        self.model.eval()
        total, n = 0.0, 0
        order = sorted(range(len(self.eval_set)), key=lambda i: len(self.eval_set[i].input_ids))
        with torch.no_grad():
            for s in range(0, len(order), self.cfg.batch_size):
                exs = [self.eval_set[i] for i in order[s:s + self.cfg.batch_size]]
                loss, k = self._loss_sum(collate(exs, self.pad_id, self.cfg.packing))
                total, n = total + float(loss), n + k
        self.model.train()
        return total / max(n, 1)

    def _eval(self) -> None:
        loss = self.evaluate()
        self.state.eval_loss.append((self.state.step, loss))
        for cb in self.callbacks:
            cb.on_eval(self, loss)

    # -- the loop
    def fit(self) -> LoopState:
        import torch

        s, cfg = self.state, self.cfg
        self.start_step = s.step
        self.model.train()
        for cb in self.callbacks:
            cb.on_begin(self)
        while s.step < s.total_steps and not s.should_stop:
            order = batch_order(self.lengths, cfg.batch_size, cfg.seed, s.epoch)
            while s.batch_pos < len(order) and s.step < s.total_steps and not s.should_stop:
                t0 = time.perf_counter()
                micro = order[s.batch_pos:s.batch_pos + cfg.grad_accum]
                batches = [collate([self.train_set[i] for i in b], self.pad_id, cfg.packing)
                           for b in micro]
                n_labels = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
                tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b
                             else b["input_ids"].numel() for b in batches)
                loss_total = 0.0
                for b in batches:
                    loss, _ = self._loss_sum(b)
                    (loss / max(n_labels, 1)).backward()
                    loss_total += float(loss.detach())
                torch.nn.utils.clip_grad_norm_(self.opt.param_groups[0]["params"],
                                               cfg.max_grad_norm)
                lr = self.opt.param_groups[0]["lr"]
                self.opt.step()
                self.sched.step()
                self.opt.zero_grad(set_to_none=True)
                s.batch_pos += len(micro)
                s.step += 1
                s.tokens += tokens
                dt = time.perf_counter() - t0
                s.train_time_s += dt
                loss_value = loss_total / max(n_labels, 1)
                s.train_loss.append((s.step, loss_value))
                logs = {"loss": loss_value, "lr": lr, "tokens": tokens, "seconds": dt}
                for cb in self.callbacks:
                    cb.on_step(self, logs)
                if self.eval_set and cfg.eval_steps and s.step % cfg.eval_steps == 0:
                    self._eval()
            if s.batch_pos >= len(order):
                s.epoch, s.batch_pos = s.epoch + 1, 0
                if self.eval_set and not cfg.eval_steps and s.step < s.total_steps:
                    self._eval()
        if self.eval_set and (not s.eval_loss or s.eval_loss[-1][0] != s.step):
            self._eval()
        for cb in self.callbacks:
            cb.on_end(self)
        return s

    # -- checkpoints
    def save_checkpoint(self) -> Path:
        import torch
        from safetensors.torch import save_file

        root = self.run_dir / "checkpoints"
        final = root / f"step-{self.state.step:07d}"
        tmp = root / f".step-{self.state.step:07d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous() for k, v in self.trainable().items()},
                  str(tmp / "trainable.safetensors"))
        if self.best_weights is not None:
            save_file({k: v.contiguous() for k, v in self.best_weights.items()},
                      str(tmp / "best.safetensors"))
        torch.save({"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps({"state": asdict(self.state), **self.meta}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(root.glob("step-*"))[:-self.cfg.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Path) -> None:
        import torch
        from safetensors.torch import load_file

        saved = json.loads((path / "state.json").read_text())
        diffs = [k for k in RESUME_KEYS if saved["hyperparameters"].get(k)
                 != self.meta["hyperparameters"].get(k)]
        if saved["data_sha256"] != self.meta["data_sha256"]:
            diffs.append("data (the training/eval examples differ)")
        if saved["base_fingerprint"] != self.meta["base_fingerprint"]:
            diffs.append("base model")
        if diffs:
            raise ConfigError(f"cannot resume from {path}: it was made with different "
                              f"{', '.join(diffs)}; rerun with the same options, or without "
                              "--resume (and a fresh --run-dir) to start over", param="resume")
        self.load_trainable(load_file(str(path / "trainable.safetensors")))
        if (path / "best.safetensors").is_file():
            self.best_weights = load_file(str(path / "best.safetensors"))
        optim = torch.load(path / "optim.pt", weights_only=True)
        self.opt.load_state_dict(optim["optimizer"])
        self.sched.load_state_dict(optim["scheduler"])
        torch.set_rng_state(optim["torch_rng"])
        st = saved["state"]
        st["train_loss"] = [tuple(x) for x in st["train_loss"]]
        st["eval_loss"] = [tuple(x) for x in st["eval_loss"]]
        self.state = LoopState(**st)


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = sorted(p for p in (run_dir / "checkpoints").glob("step-*")
                  if (p / "state.json").is_file())
    return done[-1] if done else None


def _lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def pad_token_id(tokenizer: ChatTokenizer, default: int) -> int:
    name = tokenizer.special_tokens.get("pad_token")
    tid = tokenizer.token_to_id(name) if name else None
    return tid if tid is not None else default


# -- generation eval -----------------------------------------------------------------------------

def generate(model: Any, tokenizer: ChatTokenizer, template: str, prompts: list[list[dict[str, str]]],
             max_new_tokens: int = 64, batch_size: int = 32) -> list[str]:
    """Greedy answers through the chat template (the server's rendering) with left padding."""
    import torch

    stops = tokenizer.stop_token_ids(template)
    pad = pad_token_id(tokenizer, stops[0] if stops else 0)
    encoded = [render(template, p, tokenizer).token_ids for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]):] = 1
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=stops or None,
                                 pad_token_id=pad)
            for row, i in enumerate(idx):
                new = out[row, width:].tolist()
                cut = next((k for k, t in enumerate(new) if t in stops), len(new))
                answers[i] = tokenizer.decode(new[:cut], skip_special_tokens=True)
    model.train(was_training)
    return answers


def exact_match(model: Any, tokenizer: ChatTokenizer, template: str, examples: list[Example],
                max_new_tokens: int = 64) -> dict[str, Any]:
    """Share of examples whose greedy answer equals the last assistant turn (whitespace-trimmed)."""
    prompts = [ex.messages[:-1] for ex in examples]
    refs = [ex.messages[-1]["content"].strip() for ex in examples]
    preds = generate(model, tokenizer, template, prompts, max_new_tokens)
    hits = [p.strip() == r for p, r in zip(preds, refs)]
    return {"exact_match": sum(hits) / max(1, len(hits)), "n": len(hits),
            "samples": [{"prompt": p[-1]["content"], "reference": r, "prediction": x}
                        for p, r, x in list(zip(prompts, refs, preds))[:5]]}


# -- the run -------------------------------------------------------------------------------------

def load_model(base: Path, cfg: TrainConfig) -> Any:
    """The base in float32 with a fresh LoRA (seeded) from PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    targets = cfg.target_modules
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, bias="none", task_type="CAUSAL_LM",
        modules_to_save=cfg.modules_to_save or None)
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:  # e.g. target modules not found in the base
        raise ConfigError(f"cannot build the LoRA model: {exc}", param="target_modules") from None


def run(cfg: TrainConfig, *, callbacks: list[Callback] | None = None,
        log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Validate, (inspect or) train, write the adapter atomically, register. Returns the report."""
    from loraplex.adapters.models import resolve_model

    base = resolve_model(cfg.base)  # a directory, or a hub id from the HF cache
    if not cfg.inspect:
        output.preflight(cfg)
    tokenizer = load_tokenizer(base)
    template = resolve_template(cfg.chat_template, base)
    stops = tokenizer.stop_tokens(template)
    data = prepare_data(cfg, tokenizer, template)
    for line in data.report.summary():
        log(line)
    if cfg.inspect:
        # The first N rows, then up to N of the rows the boundary rule changed.
        shown = data.train[:cfg.inspect]
        shown += [ex for ex in data.train[cfg.inspect:] if ex.cuts][:cfg.inspect]
        for ex in shown:
            for line in inspect_lines(ex, tokenizer.decode):
                print(line)
        return {"inspected": len(shown), "data": data.report.to_dict()}

    from loraplex.adapters.fingerprint import fingerprint_base

    t_start = time.time()
    meta = {"hyperparameters": cfg.hyperparameters(), "data_sha256": data.report.data_sha256,
            "base_fingerprint": fingerprint_base(base)}
    run_dir = cfg.work_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_from = latest_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and resume_from is None:
        log(f"--resume: no checkpoint in {run_dir}/checkpoints; starting from step 0")
    if not cfg.resume:
        (run_dir / "progress.jsonl").unlink(missing_ok=True)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)

    model = load_model(base, cfg)
    pad_id = pad_token_id(tokenizer, 0)  # padded positions are masked: any id would do
    cbs: list[Callback] = [JsonlLog(run_dir / "progress.jsonl", cfg.log_steps),
                           Checkpointer(cfg.save_steps)]
    if cfg.early_stopping_patience:
        cbs.append(EarlyStopping(cfg.early_stopping_patience, cfg.early_stopping_min_delta))
    if cfg.progress_bar:
        cbs.insert(0, ProgressBar())
    trainer = LoraTrainer(cfg, model, data.train, data.eval, pad_id, run_dir, meta,
                          cbs + list(callbacks or []))
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
        log(f"resumed from {resume_from} (step {trainer.state.step}, epoch "
            f"{trainer.state.epoch}, batch {trainer.state.batch_pos})")
    log(f"training {trainer.state.total_steps} steps: {len(data.train)} examples, batch "
        f"{cfg.batch_size} x {cfg.grad_accum}, LoRA r={cfg.lora_r} on "
        f"{', '.join(cfg.target_modules)}, template {template_label(template)}")
    state = trainer.fit()
    tokens_per_s = state.tokens / max(state.train_time_s, 1e-9)
    log(f"trained {state.step} steps in {state.train_time_s:.1f}s ({tokens_per_s:.0f} tokens/s)"
        + (f"; stopped early, best eval loss {state.best_eval:.4f} at step {state.best_step}"
           if state.stopped_early else ""))

    metrics: dict[str, Any] = {
        "steps": state.step, "epochs": round(state.epoch + trainer.epoch_fraction(), 4),
        "train_loss": state.train_loss[-1][1] if state.train_loss else None,
        "eval_loss": state.eval_loss[-1][1] if state.eval_loss else None,
        "best_eval_loss": state.best_eval, "best_step": state.best_step,
        "stopped_early": state.stopped_early, "tokens": state.tokens,
        "tokens_per_s": round(tokens_per_s, 1), "train_time_s": round(state.train_time_s, 2),
    }
    if data.eval and cfg.eval_exact_match:
        subset = data.eval[:cfg.eval_exact_match]
        adapted = exact_match(model, tokenizer, template, subset, cfg.max_new_tokens)
        with model.disable_adapter():
            base_em = exact_match(model, tokenizer, template, subset, cfg.max_new_tokens)
        metrics["exact_match"] = {"base": base_em["exact_match"],
                                  "adapter": adapted["exact_match"], "n": adapted["n"],
                                  "samples": adapted["samples"]}
        log(f"held-out exact match ({adapted['n']} examples): base "
            f"{base_em['exact_match']:.3f} -> adapter {adapted['exact_match']:.3f}")
    metrics["wall_time_s"] = round(time.time() - t_start, 2)
    metrics["peak_rss_mb"] = round(peak_rss_mb(), 1)

    out = output.write_adapter(cfg, model, base=base, template=template, stops=stops,
                               data=data.report, metrics=metrics, state=state,
                               run_dir=run_dir)
    log(f"adapter written to {out}")
    if not cfg.keep_checkpoints:
        shutil.rmtree(run_dir, ignore_errors=True)
    result = {"output": str(out), "metrics": metrics, "data": data.report.to_dict()}
    if cfg.register_name:
        pushed = output.register(cfg, out, base)
        log(pushed.message)
        result["registered"] = pushed.version.ref
    return result
