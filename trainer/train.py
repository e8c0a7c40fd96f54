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

Several processes (`torchrun`, `accelerate launch`; see trainer/distributed.py): DDP or FSDP2
(--fsdp), each rank training on its share of every global batch of per-device batch x processes
rows, with the loss divided by the labelled tokens of all ranks, so the step is the one a single
process would take on the whole batch. Rank 0 alone logs and writes (progress, checkpoints, the
adapter, the registry); under FSDP2 what it writes is first gathered by every rank together.
"""

from __future__ import annotations

import contextlib
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
    load_tokenizer,
    resolve_template,
    template_label,
)
from loraplex.adapters.errors import ConfigError
from loraplex.trainer import distributed, output
from loraplex.trainer.config import TrainConfig, resolve_runtime
from loraplex.trainer.dataset import Example, batch_order, collate, inspect_lines, prepare_data
from loraplex.trainer.distributed import Dist
from loraplex.trainer.evaluate import exact_match, pad_token_id
from loraplex.trainer.model import load_model

# Options that must match for --resume to continue a run (the rest may change between attempts).
RESUME_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "lr",
               "lr_scheduler", "warmup_ratio", "weight_decay", "batch_size", "grad_accum", "seed",
               "epochs", "max_steps", "packing", "train_on_inputs", "max_seq_len", "chat_template",
               "quantize")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _quiet(msg: str) -> None:
    """The log of ranks other than 0: rank 0 speaks for the run."""


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
    """Hooks for callers (tests, benchmarks); each receives the trainer (state, model, optimizer).

    The loop's own work (progress log, eval, early stopping, checkpoint) is inline in
    `LoraTrainer.fit`; `on_step` runs after all of it, when the step is complete (its eval done and
    its checkpoint written), and `on_eval` after each eval has been recorded.
    """

    def on_begin(self, t: LoraTrainer) -> None: ...
    def on_step(self, t: LoraTrainer, logs: dict[str, Any]) -> None: ...
    def on_eval(self, t: LoraTrainer, eval_loss: float) -> None: ...
    def on_end(self, t: LoraTrainer) -> None: ...


class ProgressLog:
    """progress.jsonl: a line every `every` steps (step, loss, lr, tokens/s, ETA) and per eval,
    plus the tqdm bar on stderr when `bar` is set; nothing at all when not `enabled` (ranks > 0)."""

    def __init__(self, path: Path, every: int, bar: bool, enabled: bool = True):
        self.path, self.every, self.show_bar, self.enabled = path, every, bar and enabled, enabled
        self.window: list[dict[str, Any]] = []
        self.bar: Any = None

    def _write(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def begin(self, t: LoraTrainer) -> None:
        if self.show_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=t.state.total_steps, initial=t.state.step, unit="step",
                            desc="train", file=sys.stderr, dynamic_ncols=True)

    def step(self, t: LoraTrainer, logs: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}", lr=f"{logs['lr']:.1e}",
                                 refresh=False)
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

    def eval(self, t: LoraTrainer, eval_loss: float) -> None:
        self._write({"event": "eval", "step": t.state.step, "eval_loss": round(eval_loss, 5)})

    def end(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- the trainer ---------------------------------------------------------------------------------

class LoraTrainer:
    def __init__(self, cfg: TrainConfig, model: Any, train: list[Example], eval: list[Example],
                 pad_id: int, run_dir: Path, meta: dict[str, Any],
                 callbacks: list[Callback] | None = None, dist: Dist | None = None):
        import torch

        self.cfg, self.model, self.train_set, self.eval_set = cfg, model, train, eval
        self.pad_id, self.run_dir, self.meta = pad_id, run_dir, meta
        self.callbacks = callbacks or []
        self.dist = dist or Dist()
        # The forward of training goes through DDP (its backward all-reduces the gradients); eval,
        # weights and saving use the PEFT model itself. FSDP2 shards the model in place: the net
        # is the model, and everything that reads or writes its weights is collective.
        self.runtime = resolve_runtime(cfg)
        self.net = self.dist.wrap(model, self.runtime.device)
        # A batch is global: per-device rows x processes, split among the ranks at each step.
        self.global_batch = cfg.batch_size * self.dist.world
        self.lengths = [len(ex.input_ids) for ex in train]
        self.batches_per_epoch = math.ceil(len(train) / self.global_batch)
        steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accum)
        total = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
        self.state = LoopState(total_steps=total)
        self.best_weights: dict[str, Any] | None = None
        self.device = next(model.parameters()).device
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            self.runtime.precision)
        # fp16 gradients of small losses underflow: scale the loss, unscale before clipping.
        # Under FSDP2 each rank sees a shard of the gradients: ShardedGradScaler agrees on an
        # overflow across ranks, so all skip the same steps.
        self.scaler: Any = None
        if self.runtime.precision == "fp16":
            if self.dist.sharded:
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

                self.scaler = ShardedGradScaler(self.device.type)
            else:
                self.scaler = torch.amp.GradScaler(self.device.type)
        self.start_step = 0
        self.progress = ProgressLog(run_dir / "progress.jsonl", cfg.log_steps, cfg.progress_bar,
                                    enabled=self.dist.is_main)
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = round(cfg.warmup_ratio * total)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: _lr_factor(
            s, warmup, total, cfg.lr_scheduler))

    # -- weights
    def trainable(self) -> dict[str, Any]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def trainable_state(self) -> dict[str, Any]:
        """The trained weights, whole, as CPU copies (under FSDP2 gathered: every rank calls it)."""
        return self.dist.full_state(self.model)

    def load_trainable(self, weights: dict[str, Any]) -> None:
        """Set the trained weights from whole tensors (under FSDP2: every rank calls it)."""
        self.dist.load_full_state(self.model, weights)

    def epoch_fraction(self) -> float:
        return self.state.batch_pos / max(1, self.batches_per_epoch)

    # -- loss
    def autocast(self) -> Any:
        """Mixed precision around forward and loss (bf16/fp16); nothing for fp32."""
        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _loss_sum(self, batch: dict[str, Any], net: Any = None) -> tuple[Any, int]:
        import torch
        import torch.nn.functional as F

        labels = batch.pop("labels")
        n = int((labels[:, 1:] != -100).sum())
        inputs: dict[str, Any] = {k: v.to(self.device, non_blocking=True)
                                  if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        inputs.setdefault("use_cache", False)  # no KV cache for a loss (and none with checkpointing)
        target = labels[:, 1:].to(self.device, non_blocking=True)
        with self.autocast():
            logits = (self.model if net is None else net)(**inputs).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                   target.reshape(-1), ignore_index=-100, reduction="sum")
        return loss, n

    def evaluate(self) -> float:
        """Loss per labelled token of the eval set; each rank takes its share of every batch."""
        import torch

        self.model.eval()
        total, n = 0.0, 0
        order = sorted(range(len(self.eval_set)), key=lambda i: len(self.eval_set[i].input_ids))
        with torch.no_grad():
            for s in range(0, len(order), self.global_batch):
                exs = [self.eval_set[i] for i in self.dist.shard(order[s:s + self.global_batch])]
                if exs:
                    loss, k = self._loss_sum(collate(exs, self.pad_id, self.cfg.packing))
                    total, n = total + float(loss), n + k
                elif self.dist.sharded:  # every FSDP2 rank takes part in each forward: a row
                    self._loss_sum(collate([self.eval_set[order[s]]], self.pad_id,
                                           self.cfg.packing))  # at weight 0
        total, n = self.dist.sum([total, n], self.device)
        self.model.train()
        return total / max(n, 1)

    # -- the loop
    def _train_step(self, micro: list[list[int]]) -> dict[str, Any]:
        """One optimizer step over the (global) micro-batches `micro`; returns its log record."""
        import torch

        cfg, dist = self.cfg, self.dist
        t0 = time.perf_counter()
        # This rank's rows of each micro-batch. A rank left with none (a short last batch) runs one
        # row at weight 0: it must still take part in DDP's all-reduce of the gradients (FSDP2's
        # all-gathers and reduce-scatter).
        shares = [dist.shard(b) for b in micro]
        weights = [1.0 if rows else 0.0 for rows in shares]
        batches = [collate([self.train_set[i] for i in (rows or b[:1])], self.pad_id, cfg.packing)
                   for rows, b in zip(shares, micro)]
        n_labels = sum(int((b["labels"][:, 1:] != -100).sum()) for b, w in zip(batches, weights)
                       if w)
        tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b
                     else b["input_ids"].numel() for b, w in zip(batches, weights) if w)
        # Every rank divides by the labelled tokens of the whole step (all ranks), and DDP (FSDP2's
        # reduce-scatter alike) averages the gradients over ranks, so each scales by the world
        # size: the result is the gradient of one process's loss over the whole step.
        n_labels, tokens = dist.sum([n_labels, tokens], self.device)
        loss_total = 0.0
        for k, (b, w) in enumerate(zip(batches, weights)):
            with dist.no_sync(self.net, sync=k == len(batches) - 1):
                loss, _ = self._loss_sum(b, self.net)
                scaled = loss * (w * dist.world) / max(n_labels, 1)
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_total += w * float(loss.detach())
        (loss_total,) = dist.sum([loss_total], self.device)
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        # Under FSDP2 the gradients are DTensor shards: clip_grad_norm_ computes the norm of the
        # whole gradient (a reduction over the ranks) and every rank scales its shard by it.
        torch.nn.utils.clip_grad_norm_(self.opt.param_groups[0]["params"], cfg.max_grad_norm)
        lr = self.opt.param_groups[0]["lr"]
        if self.scaler is not None:
            self.scaler.step(self.opt)  # skipped when the gradients overflowed
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return {"loss": loss_total / max(n_labels, 1), "lr": lr, "tokens": int(tokens),
                "seconds": time.perf_counter() - t0}

    def _eval(self) -> None:
        """Eval now, record it, and update the best weights / early-stopping counter."""
        s, cfg = self.state, self.cfg
        loss = self.evaluate()
        s.eval_loss.append((s.step, loss))
        self.progress.eval(self, loss)
        if cfg.early_stopping_patience:
            if s.best_eval is None or loss < s.best_eval - cfg.early_stopping_min_delta:
                s.best_eval, s.best_step, s.evals_without_improvement = loss, s.step, 0
                self.best_weights = self.trainable_state()
            else:
                s.evals_without_improvement += 1
                if s.evals_without_improvement >= cfg.early_stopping_patience:
                    s.should_stop = s.stopped_early = True
        for cb in self.callbacks:
            cb.on_eval(self, loss)

    def _epoch_end_eval_due(self) -> bool:
        """Without --eval-steps: eval at each epoch boundary (the final eval comes after the loop)."""
        s = self.state
        return bool(self.eval_set) and not self.cfg.eval_steps and s.step < s.total_steps

    def fit(self) -> LoopState:
        """Train to total_steps (or an early stop). Each step, in this order: the optimizer step,
        its progress log, its eval (+ early stopping) when due, then its checkpoint when due, so
        a checkpoint holds the eval of its own step and a resumed run repeats nothing and skips
        nothing."""
        s, cfg = self.state, self.cfg
        self.start_step = s.step
        self.model.train()
        self.progress.begin(self)
        for cb in self.callbacks:
            cb.on_begin(self)
        if s.batch_pos >= self.batches_per_epoch:  # a checkpoint from before the epoch rollover
            s.epoch, s.batch_pos = s.epoch + 1, 0
            if self._epoch_end_eval_due() and (not s.eval_loss or s.eval_loss[-1][0] != s.step):
                self._eval()
        order, order_epoch = None, -1
        while s.step < s.total_steps and not s.should_stop:
            if order_epoch != s.epoch:
                order, order_epoch = batch_order(self.lengths, self.global_batch, cfg.seed,
                                                 s.epoch), s.epoch
            assert order is not None
            micro = order[s.batch_pos:s.batch_pos + cfg.grad_accum]
            logs = self._train_step(micro)
            s.batch_pos += len(micro)
            s.step += 1
            s.tokens += logs["tokens"]
            s.train_time_s += logs["seconds"]
            s.train_loss.append((s.step, logs["loss"]))
            epoch_done = s.batch_pos >= len(order)
            if epoch_done:
                s.epoch, s.batch_pos = s.epoch + 1, 0
            # 1. log  2. eval + early stopping  3. checkpoint (holding 1 and 2)  4. caller hooks
            self.progress.step(self, logs)
            if (self.eval_set and cfg.eval_steps and s.step % cfg.eval_steps == 0) or (
                    epoch_done and self._epoch_end_eval_due()):
                self._eval()
            if cfg.save_steps and s.step % cfg.save_steps == 0 and s.step < s.total_steps:
                self.save_checkpoint()
            for cb in self.callbacks:
                cb.on_step(self, logs)
        if self.eval_set and (not s.eval_loss or s.eval_loss[-1][0] != s.step):
            self._eval()
        if self.best_weights is not None and s.best_step != s.step:
            self.load_trainable(self.best_weights)
        self.progress.end()
        for cb in self.callbacks:
            cb.on_end(self)
        return s

    # -- checkpoints
    def _rng_state(self) -> dict[str, Any]:
        import torch

        rng = {"torch_rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return rng

    def save_checkpoint(self) -> Path:
        """Rank 0 writes the checkpoint (the weights and optimizer are the same on every rank;
        under FSDP2 every rank first gathers them whole, so the files are those of DDP), with
        every rank's RNG state: each rank draws its own dropout masks."""
        rngs = self.dist.gather(self._rng_state())
        weights = self.trainable_state()
        optim = self.dist.optimizer_state(self.model, self.opt)
        return self.dist.on_main(lambda: self._write_checkpoint(rngs, weights, optim))

    def _write_checkpoint(self, rngs: list[dict[str, Any]], weights: dict[str, Any],
                          optimizer: dict[str, Any]) -> Path:
        import torch
        from safetensors.torch import save_file

        root = self.run_dir / "checkpoints"
        final = root / f"step-{self.state.step:07d}"
        tmp = root / f".step-{self.state.step:07d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in weights.items()},
                  str(tmp / "trainable.safetensors"))
        if self.best_weights is not None:
            save_file({k: v.contiguous() for k, v in self.best_weights.items()},
                      str(tmp / "best.safetensors"))
        optim = {"optimizer": optimizer, "scheduler": self.sched.state_dict(),
                 **rngs[0]}
        if self.dist.launched:
            optim["rank_rng"] = rngs
        if self.scaler is not None:
            optim["scaler"] = self.scaler.state_dict()
        torch.save(optim, tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps({"state": asdict(self.state), **self.meta,
                                                    "world_size": self.dist.world}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(root.glob("step-*"))[:-self.cfg.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Path) -> None:
        import torch
        from safetensors.torch import load_file

        saved = json.loads((path / "state.json").read_text())
        # The batch order, each rank's share of it and each rank's RNG state all depend on the
        # number of processes: a different one cannot continue the same run.
        world = saved.get("world_size", 1)
        if world != self.dist.world:
            raise ConfigError(f"cannot resume from {path}: it was written by a run of {world} "
                              f"process(es), and this run has {self.dist.world}; relaunch with "
                              f"{world} process(es) in all (torchrun --nnodes x --nproc-per-node), "
                              "or rerun without --resume (and a fresh --run-dir) to start over",
                              param="resume")
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
        optim = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
        self.dist.load_optimizer_state(self.model, self.opt, optim["optimizer"])
        self.sched.load_state_dict(optim["scheduler"])
        rng = optim["rank_rng"][self.dist.rank] if "rank_rng" in optim else optim
        torch.set_rng_state(rng["torch_rng"])
        if "cuda_rng" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda_rng"], self.device)
        if "scaler" in optim and self.scaler is not None:
            self.scaler.load_state_dict(optim["scaler"])
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


# -- the run -------------------------------------------------------------------------------------

def run(cfg: TrainConfig, *, callbacks: list[Callback] | None = None,
        log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Validate, (inspect or) train, write the adapter atomically, register. Returns the report.

    Under `torchrun` / `accelerate launch` every process runs this; rank 0 alone logs and writes,
    the others wait for it and return the same report.
    """
    dist = distributed.init(resolve_runtime(cfg).device, cfg.distributed, cfg.quantize)
    try:
        return _run(cfg, dist, list(callbacks or []), log if dist.is_main else _quiet)
    finally:
        dist.close()


def _prepare_run_dir(cfg: TrainConfig, log: Callable[[str], None]) -> Path | None:
    """Make the run dir; return the checkpoint to resume from (--resume), else clear old ones."""
    run_dir = cfg.work_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_from = latest_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and resume_from is None:
        log(f"--resume: no checkpoint in {run_dir}/checkpoints; starting from step 0")
    if not cfg.resume:
        (run_dir / "progress.jsonl").unlink(missing_ok=True)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return resume_from


def _run(cfg: TrainConfig, dist: Dist, callbacks: list[Callback],
         log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from loraplex.adapters.models import resolve_model

    base = resolve_model(cfg.base)  # a directory, or a hub id from the HF cache
    if not cfg.inspect:
        dist.on_main(lambda: output.preflight(cfg))
    tokenizer = load_tokenizer(base)
    template = resolve_template(cfg.chat_template, base)
    stops = tokenizer.stop_tokens(template)
    # Every rank reads and tokenizes the same data (deterministic), then takes its share per step.
    data = prepare_data(cfg, tokenizer, template)
    for line in data.report.summary():
        log(line)
    if cfg.inspect:
        # The first N rows, then up to N of the rows the boundary rule changed.
        shown = data.train[:cfg.inspect]
        shown += [ex for ex in data.train[cfg.inspect:] if ex.cuts][:cfg.inspect]
        for ex in shown if dist.is_main else []:
            for line in inspect_lines(ex, tokenizer.decode):
                print(line)
        return {"inspected": len(shown), "data": data.report.to_dict()}

    from loraplex.adapters.fingerprint import fingerprint_base

    t_start = time.time()
    effective_batch = cfg.batch_size * dist.world * cfg.grad_accum
    hyperparameters = cfg.hyperparameters() | {"processes": dist.world,
                                               "effective_batch_size": effective_batch}
    if dist.launched:
        hyperparameters["distributed"] = dist.engine
    meta = {"hyperparameters": hyperparameters, "data_sha256": data.report.data_sha256,
            "base_fingerprint": fingerprint_base(base)}
    run_dir = cfg.work_dir
    resume_from = dist.on_main(lambda: _prepare_run_dir(cfg, log))
    if resume_from is not None:  # every rank reads the checkpoint rank 0 chose
        dist.check(None if (resume_from / "state.json").is_file() else
                   f"checkpoint {resume_from} is not visible on this node; with several nodes, "
                   "--run-dir must be on storage that every node mounts")

    if dist.engine == "fsdp" and not dist.launched:
        log("note: --fsdp has no effect without a launcher (torchrun --nproc-per-node N ..., or "
            "accelerate launch): this is one process holding the whole model")
    # FSDP2 shards the base from the CPU onto each rank's device (LoraTrainer, dist.wrap).
    model = load_model(base, cfg, place=not dist.sharded)
    if dist.rank:
        # The LoRA init above is the same on every rank (seeded; DDP also broadcasts rank 0's);
        # from here each rank draws its own dropout masks, as one process does for distinct rows.
        torch.manual_seed(cfg.seed * 1_000_003 + dist.rank)
    pad_id = pad_token_id(tokenizer, 0)  # padded positions are masked: any id would do
    trainer = LoraTrainer(cfg, model, data.train, data.eval, pad_id, run_dir, meta, callbacks,
                          dist)
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
        log(f"resumed from {resume_from} (step {trainer.state.step}, epoch "
            f"{trainer.state.epoch}, batch {trainer.state.batch_pos})")
    log(f"training {trainer.state.total_steps} steps: {len(data.train)} examples, effective batch "
        f"{effective_batch} = {cfg.batch_size} per device x {dist.world} process(es) x "
        f"{cfg.grad_accum} accumulation step(s), LoRA r={cfg.lora_r} on "
        f"{', '.join(cfg.target_modules)}, template {template_label(template)}; "
        f"{trainer.runtime.describe()}" + (f", {'FSDP2' if dist.sharded else 'DDP'} over "
                                           f"{dist.backend}" if dist.launched else ""))
    for note in (distributed.accelerate_precision_note(trainer.runtime.precision),
                 distributed.accelerate_fsdp_note() if dist.sharded else None):
        if note:
            log(note)
    state = trainer.fit()
    tokens_per_s = state.tokens / max(state.train_time_s, 1e-9)
    log(f"trained {state.step} steps in {state.train_time_s:.1f}s ({tokens_per_s:.0f} tokens/s)"
        + (f"; stopped early, best eval loss {state.best_eval:.4f} at step {state.best_step}"
           if state.stopped_early else ""))

    def measure_exact_match() -> dict[str, Any]:
        """Greedy exact match of the adapter and the base on held-out rows (under FSDP2 every
        rank generates for its share of them; otherwise rank 0 alone)."""
        subset = data.eval[:cfg.eval_exact_match]
        adapted = exact_match(model, tokenizer, template, subset, cfg.max_new_tokens, dist=dist)
        with model.disable_adapter():
            base_em = exact_match(model, tokenizer, template, subset, cfg.max_new_tokens,
                                  dist=dist)
        log(f"held-out exact match ({adapted['n']} examples): base "
            f"{base_em['exact_match']:.3f} -> adapter {adapted['exact_match']:.3f}")
        return {"base": base_em["exact_match"], "adapter": adapted["exact_match"],
                "n": adapted["n"], "samples": adapted["samples"]}

    # Under FSDP2 the model is sharded: every rank takes part in the exact match and in gathering
    # the trained weights for the adapter, before rank 0 alone writes it.
    sharded_em = (measure_exact_match() if dist.sharded and data.eval and cfg.eval_exact_match
                  else None)
    full_weights = trainer.trainable_state() if dist.sharded else None

    def finish() -> dict[str, Any]:
        """Rank 0 alone: exact match (unless sharded), the adapter (written, then verified), the
        registry."""
        metrics: dict[str, Any] = {
            "steps": state.step, "epochs": round(state.epoch + trainer.epoch_fraction(), 4),
            "train_loss": state.train_loss[-1][1] if state.train_loss else None,
            "eval_loss": state.eval_loss[-1][1] if state.eval_loss else None,
            "best_eval_loss": state.best_eval, "best_step": state.best_step,
            "stopped_early": state.stopped_early, "tokens": state.tokens,
            "tokens_per_s": round(tokens_per_s, 1), "train_time_s": round(state.train_time_s, 2),
        }
        if data.eval and cfg.eval_exact_match:
            metrics["exact_match"] = sharded_em or measure_exact_match()
        metrics["wall_time_s"] = round(time.time() - t_start, 2)
        metrics["peak_rss_mb"] = round(peak_rss_mb(), 1)
        if trainer.runtime.quantize != "none":
            # QLoRA: a plain LoRA on a base it never saw in full precision. vLLM serves it on
            # the unquantized base, so served outputs differ slightly from those measured here.
            metrics["quantized_base"] = {
                "quantize": trainer.runtime.quantize,
                "note": "trained on a bitsandbytes-quantized base (exact match above was "
                        "measured on it); the adapter is a normal LoRA, served on the "
                        "unquantized base: evaluate it through the server before promoting"}
            log(f"trained on a {trainer.runtime.quantize} base (QLoRA): the adapter serves on "
                "the unquantized base; evaluate it through the server")

        out = output.write_adapter(cfg, model, base=base, template=template, stops=stops,
                                   data=data.report, metrics=metrics, state=state,
                                   run_dir=run_dir, hyperparameters=hyperparameters, log=log,
                                   weights=full_weights)
        log(f"adapter written to {out}")
        if not cfg.keep_checkpoints:
            shutil.rmtree(run_dir, ignore_errors=True)
        result = {"output": str(out), "metrics": metrics, "data": data.report.to_dict()}
        if cfg.register_name:
            pushed = output.register(cfg, out, base)
            log(pushed.message)
            result["registered"] = pushed.version.ref
        return result

    return dist.on_main(finish)
