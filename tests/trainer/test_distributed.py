"""Several processes (DDP over gloo, launched by torchrun) on the toy base, and the adapter check.

A 2-process run with per-device batch b takes the steps of one process with batch 2b: the same
global batches, the loss divided by the labelled tokens of both ranks, DDP's gradient average
undone by the world size. Only rank 0 writes (one adapter, one progress log, one registry version).
A 2-process run interrupted and resumed ends with the weights of an uninterrupted one (dropout on:
each rank's RNG state is in the checkpoint); a resume with another number of processes is refused.

This file is also the driver torchrun starts for the resume case (`python -m torch.distributed.run
... test_distributed.py resume SPEC`): interrupting a run needs a callback, which the CLI has not.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).resolve().parents[2] / "trainer" / "data"
WORDS, HELDOUT = str(DATA / "words.alpaca.jsonl"), str(DATA / "words.alpaca.heldout.jsonl")
# Measured (fp32, 2-core CPU): the 2-process adapter is within 4.7e-7 of the 1-process one with
# twice the batch (summation order: padding widths and the all-reduce differ); a 1-process run
# with the per-device batch differs by 6.7e-3, another seed by 1.3e-1. PARITY_ATOL sits between,
# at least 100x below both contrasts (asserted), so it tells these runs apart.
PARITY_ATOL = 1e-5
# 111 rows in global batches of 10: the last batch has 1 row, so rank 1 once has no row of its
# own (it runs one at weight 0 to join the all-reduce); 12 micro-batches of 2 = 6 steps.
PARITY = dict(epochs=1, grad_accum=2, lora_r=4, lora_alpha=8, lr=1e-3, seed=0,
              eval_exact_match=2, max_new_tokens=4, log_steps=1)
RESUME = dict(max_steps=6, batch_size=2, grad_accum=2, lora_dropout=0.1, lora_r=4, lora_alpha=8,
              lr=1e-3, eval_steps=2, lr_scheduler="linear", warmup_ratio=0.3, eval_exact_match=0,
              progress_bar=False)


@pytest.fixture
def one_thread():
    """In-process runs on one thread, like each torchrun process (OMP_NUM_THREADS=1): on a busy
    2-core machine, two threads per run made them ten times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    # --standalone: a local rendezvous on a free port (other test runs may share this machine).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p


def flags(options: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for k, v in options.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def weights(adapter: str | Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter) / "adapter_model.safetensors"))


def report(adapter: str | Path) -> dict:
    return json.loads((Path(adapter) / "report.json").read_text())


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_processes_equal_one_process_with_twice_the_batch(toy_model_dir, quick_cfg,
                                                              tmp_path, one_thread):
    from loraplex.adapters.registry import Registry
    from loraplex.trainer.train import run

    db, store = f"sqlite:///{tmp_path / 'reg.db'}", str(tmp_path / "artifacts")
    two = tmp_path / "runs" / "two"
    p = torchrun("-m", "loraplex.adapters.cli", "train", "--base", str(toy_model_dir),
                 "--data", WORDS, "--eval-data", HELDOUT, "--output", str(two), "--batch-size",
                 "5", *flags(PARITY), "--no-progress-bar", "--register", "words", "--alias",
                 "prod", "--registry-url", db, "--artifacts-url", store)
    # Rank 0 alone speaks and writes: one start line with the effective batch, one adapter.
    err = p.stderr
    assert err.count("effective batch 20 = 5 per device x 2 process(es) x 2 accumulation") == 1
    assert err.count("DDP over gloo") == 1
    assert err.count("verified the adapter: 56 LoRA tensors of 28 modules") == 1
    assert err.count("adapter written to") == 1
    assert sorted(x.name for x in two.parent.iterdir()) == ["two"]  # no run dir, no partial
    progress = [json.loads(x) for x in (two / "progress.jsonl").read_text().splitlines()]
    assert [r["step"] for r in progress if r["event"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in progress if r["event"] == "eval"] == [6]
    rep2 = report(two)
    assert rep2["verified"] == {"tensors": 56, "modules": 28, "rank": 4, "peft_load": True,
                                "registry_validation": True}
    hp = json.loads((two / "loraplex.json").read_text())["hyperparameters"]
    assert (hp["processes"], hp["effective_batch_size"], hp["batch_size"]) == (2, 20, 5)
    with Registry(db, store) as reg:
        assert [v.ref for v in reg.list("words")] == ["words@1"]
        assert reg.resolve("words:prod").version == 1

    def one_process(name: str, **over: Any) -> dict:
        cfg = quick_cfg(output=str(tmp_path / name), **{**PARITY, "max_steps": None, **over})
        return run(cfg, log=lambda m: None)

    one = one_process("one", batch_size=10)
    # Contrasts (no exact match, 6 steps): what one rank alone would have trained, another seed.
    half = one_process("half", batch_size=5, max_steps=6, eval_exact_match=0)
    other_seed = one_process("seed1", batch_size=10, seed=1, eval_exact_match=0)

    w2, w1 = weights(two), weights(one["output"])
    parity = max_diff(w2, w1)
    contrasts = {"per-device batch": max_diff(w2, weights(half["output"])),
                 "another seed": max_diff(w1, weights(other_seed["output"]))}
    print(f"max |2 processes - 1 process, batch x2| = {parity:.2e}; contrasts: "
          + ", ".join(f"{k} {v:.2e}" for k, v in contrasts.items()))
    assert parity <= PARITY_ATOL
    assert min(contrasts.values()) > 100 * PARITY_ATOL  # the tolerance tells the runs apart
    # The same loss curve, step by step, and the same eval loss.
    rep1 = report(one["output"])
    l2, l1 = rep2["history"]["train_loss"], rep1["history"]["train_loss"]
    assert [s for s, _ in l2] == [s for s, _ in l1] == [1, 2, 3, 4, 5, 6]
    for (_, a), (_, b) in zip(l2, l1):
        assert a == pytest.approx(b, rel=1e-5)
    assert rep2["metrics"]["eval_loss"] == pytest.approx(rep1["metrics"]["eval_loss"], rel=1e-5)
    assert rep2["metrics"]["tokens"] == rep1["metrics"]["tokens"]


def test_resume_of_a_two_process_run_is_exact(toy_model_dir, tmp_path, one_thread):
    from loraplex.adapters.errors import ConfigError
    from loraplex.trainer.config import load_config
    from loraplex.trainer.train import run

    spec = {"base": str(toy_model_dir), "root": str(tmp_path)}
    p = torchrun(__file__, "resume", json.dumps(spec))
    assert p.stderr.count("resumed from") == 1 and "(step 3," in p.stderr
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ha, hb = report(straight)["history"], report(resumed)["history"]
    for curve in ("train_loss", "eval_loss"):
        assert [s for s, _ in ha[curve]] == [s for s, _ in hb[curve]]
        assert [x for _, x in ha[curve]] == pytest.approx([x for _, x in hb[curve]], rel=1e-6)
    assert [s for s, _ in ha["eval_loss"]] == [2, 4, 6]
    assert max_diff(weights(straight), weights(resumed)) <= 1e-6

    # The kept checkpoint (2 processes) cannot continue in 1 process.
    cfg = load_config(None, {**RESUME, "base": str(toy_model_dir), "data": [WORDS],
                             "eval_data": [HELDOUT], "output": str(tmp_path / "again"),
                             "run_dir": str(tmp_path / "resumed.run"), "resume": True})
    with pytest.raises(ConfigError, match=r"written by a run of 2 process\(es\), and this run "
                                          r"has 1; relaunch with 2 process\(es\)"):
        run(cfg, log=lambda m: None)
    assert not (tmp_path / "again").exists()


def test_verify_refuses_a_missing_an_empty_or_an_untrained_tensor(toy_model_dir, tmp_path):
    import torch
    from safetensors.torch import save_file

    from loraplex.adapters.errors import AdapterInvalid
    from loraplex.trainer.config import load_config
    from loraplex.trainer.model import load_model
    from loraplex.trainer.output import VERIFY_ADAPTER, verify_adapter

    cfg = load_config(None, {"base": str(toy_model_dir), "data": [WORDS], "lora_r": 4,
                             "output": str(tmp_path / "unused")})
    model = load_model(toy_model_dir, cfg)
    with torch.no_grad():  # as after training: lora_B starts at zero
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(std=0.01)
    good = tmp_path / "good"
    model.save_pretrained(str(good))
    assert verify_adapter(good, model, toy_model_dir)["tensors"] == 56
    assert VERIFY_ADAPTER not in model.peft_config  # the loaded copy is gone again

    saved = weights(good)
    key = sorted(k for k in saved if ".lora_A." in k)[0]
    cases = {
        "missing": ({k: v for k, v in saved.items() if k != key}, f"{key}: trained, but missing"),
        "empty": ({**saved, key: torch.empty(0, saved[key].shape[1])}, f"{key}: empty tensor"),
        "untrained": ({k: torch.zeros_like(v) if ".lora_B." in k else v
                       for k, v in saved.items()},
                      "every lora_B weight is zero"),
    }
    for name, (tensors, message) in cases.items():
        bad = tmp_path / name
        shutil.copytree(good, bad)
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  str(bad / "adapter_model.safetensors"))
        with pytest.raises(AdapterInvalid, match="failed verification") as err:
            verify_adapter(bad, model, toy_model_dir)
        assert message in str(err.value), (name, str(err.value))
        if name != "untrained":  # PEFT and the registry see it too
            assert "registry validation:" in str(err.value)


def test_deepspeed_launch_is_refused_before_anything_runs(quick_cfg, monkeypatch):
    from loraplex.adapters.errors import ConfigError
    from loraplex.trainer.distributed import FollowerExit
    from loraplex.trainer.train import run

    cfg = quick_cfg()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match=r"configured for DeepSpeed, which loraplex train does "
                                          r"not support \(and is not installed with it\); for a "
                                          r"base that does not fit one GPU use FSDP2: `torchrun "
                                          r"\.\.\. loraplex train --fsdp`"):
        run(cfg, log=lambda m: None)
    monkeypatch.setenv("RANK", "1")  # the other ranks leave quietly: rank 0 reports it
    with pytest.raises(FollowerExit) as left:
        run(cfg, log=lambda m: None)
    assert left.value.code == 2
    assert not cfg.output.exists() and not cfg.work_dir.exists()


# -- the torchrun driver of test_resume_of_a_two_process_run_is_exact ----------------------------

def _resume_driver(spec: dict[str, str]) -> None:
    import torch.distributed as dist

    from loraplex.trainer.config import load_config
    from loraplex.trainer.train import Callback, run

    class CrashAfter(Callback):
        def on_step(self, t, logs):
            if t.state.step == 5:
                raise RuntimeError("simulated crash after step 5")

    # One process group for the three runs (run() joins it rather than making its own).
    dist.init_process_group("gloo")
    common = {**RESUME, "base": spec["base"], "data": [WORDS], "eval_data": [HELDOUT]}
    def quiet(msg: str) -> None:
        pass

    run(load_config(None, {**common, "output": f"{spec['root']}/straight"}), log=quiet)
    cfg = load_config(None, {**common, "output": f"{spec['root']}/resumed", "save_steps": 3,
                             "keep_checkpoints": True})
    try:
        run(cfg, callbacks=[CrashAfter()], log=quiet)
        raise AssertionError("the run was not interrupted")
    except RuntimeError as exc:
        assert "simulated crash" in str(exc)
    run(cfg.model_copy(update={"resume": True}))  # logs (rank 0): "resumed from ..."
    dist.destroy_process_group()


if __name__ == "__main__":
    assert sys.argv[1] == "resume"
    _resume_driver(json.loads(sys.argv[2]))
