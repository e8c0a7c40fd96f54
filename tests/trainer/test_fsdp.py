"""FSDP2 (`--fsdp`, or an accelerate FSDP launch) on the toy base: 2 processes over gloo, torchrun.

A 2-process FSDP2 run with per-device batch b takes the steps of one process with batch 2b, as
DDP does (tests/trainer/test_distributed.py): the same loss curve, eval losses, exact match,
best-weights choice and early stop, the same checkpoint (weights and optimizer state gathered into
the single-process format) and the same adapter, written once by rank 0 and verified. Gradient
clipping is active in every step (max_grad_norm well below the gradient norms), so a norm taken
over one rank's shard instead of the whole gradient would show. A 2-process FSDP2 run selected by
accelerate's environment (ACCELERATE_USE_FSDP=true), interrupted and resumed, ends as an
uninterrupted one; its exact match has fewer prompts than ranks (rank 1 generates for a repeated
prompt and drops the answer, so both run the same forwards).

This file is also the driver torchrun starts for the resume case (`python -m torch.distributed.run
... test_fsdp.py resume SPEC`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distributed import (  # noqa: E402 - the DDP tests' helpers and data
    HELDOUT,
    PARITY,
    PARITY_ATOL,
    RESUME,
    WORDS,
    flags,
    max_diff,
    report,
    torchrun,
    weights,
)

# PARITY (6 steps of 2 micro-batches, a 1-row last batch) plus: clipping in every step, an eval
# every 2 steps with an early stop that never sees an improvement (min delta 100), so the best
# weights are those of step 2, snapshotted, checkpointed at step 3 and restored at the end, and
# 3 exact-match prompts over 2 ranks.
FSDP_PARITY = {**PARITY, "max_grad_norm": 0.05, "eval_steps": 2, "early_stopping_patience": 2,
               "early_stopping_min_delta": 100, "save_steps": 3, "keep_checkpoints": True,
               "eval_exact_match": 3}


@pytest.fixture
def one_thread():
    """One thread in-process, like each torchrun process (see test_distributed.one_thread)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_fsdp_two_processes_equal_one_process_with_twice_the_batch(toy_model_dir, quick_cfg,
                                                                   tmp_path, one_thread):
    import torch
    from safetensors.torch import load_file

    from loraplex.adapters.registry import Registry
    from loraplex.trainer.train import run

    db, store = f"sqlite:///{tmp_path / 'reg.db'}", str(tmp_path / "artifacts")
    two = tmp_path / "runs" / "two"
    p = torchrun("-m", "loraplex.adapters.cli", "train", "--fsdp", "--base", str(toy_model_dir),
                 "--data", WORDS, "--eval-data", HELDOUT, "--output", str(two), "--batch-size",
                 "5", *flags({k: v for k, v in FSDP_PARITY.items() if k != "keep_checkpoints"}),
                 "--keep-checkpoints", "--no-progress-bar", "--register", "words",
                 "--registry-url", db, "--artifacts-url", store)
    err = p.stderr
    assert err.count("effective batch 20 = 5 per device x 2 process(es) x 2 accumulation") == 1
    assert err.count("FSDP2 over gloo") == 1 and "DDP over" not in err
    assert err.count("verified the adapter: 56 LoRA tensors of 28 modules") == 1
    assert err.count("adapter written to") == 1
    rep2 = report(two)
    assert rep2["verified"] == {"tensors": 56, "modules": 28, "rank": 4, "peft_load": True,
                                "registry_validation": True}
    hp = json.loads((two / "loraplex.json").read_text())["hyperparameters"]
    assert (hp["processes"], hp["distributed"], hp["effective_batch_size"]) == (2, "fsdp", 20)
    with Registry(db, store) as reg:
        assert [v.ref for v in reg.list("words")] == ["words@1"]

    cfg = quick_cfg(output=str(tmp_path / "one"), **{**FSDP_PARITY, "max_steps": None},
                    batch_size=10)
    one = run(cfg, log=lambda m: None)
    rep1 = report(one["output"])
    # The same steps: loss per step, eval losses, early stop at step 6 with the best of step 2.
    l2, l1 = rep2["history"]["train_loss"], rep1["history"]["train_loss"]
    assert [s for s, _ in l2] == [s for s, _ in l1] == [1, 2, 3, 4, 5, 6]
    loss_diff = max(abs(a - b) / abs(b) for (_, a), (_, b) in zip(l2, l1))
    e2, e1 = rep2["history"]["eval_loss"], rep1["history"]["eval_loss"]
    assert [s for s, _ in e2] == [s for s, _ in e1] == [2, 4, 6]
    for (_, a), (_, b) in zip(e2, e1):
        assert a == pytest.approx(b, rel=1e-5)
    m2, m1 = rep2["metrics"], rep1["metrics"]
    assert (m2["best_step"], m2["stopped_early"]) == (m1["best_step"], m1["stopped_early"]) \
        == (2, True)
    assert m2["tokens"] == m1["tokens"]
    assert m2["exact_match"] == m1["exact_match"] and m2["exact_match"]["n"] == 3
    parity = max_diff(weights(two), weights(one["output"]))
    # The step-3 checkpoint: gathered weights, best weights and optimizer state, in the format of
    # one process (parameters numbered in order), equal to the single-process one.
    c2, c1 = (Path(f"{d}.run") / "checkpoints" / "step-0000003" for d in (two, one["output"]))
    ckpt = max(max_diff(load_file(str(c2 / f)), load_file(str(c1 / f)))
               for f in ("trainable.safetensors", "best.safetensors"))
    o2, o1 = (torch.load(c / "optim.pt", map_location="cpu", weights_only=True)["optimizer"]
              for c in (c2, c1))
    assert o2["param_groups"] == o1["param_groups"] and o2["state"].keys() == o1["state"].keys()
    moments = max(float((o2["state"][i][k] - o1["state"][i][k]).abs().max())
                  for i in o1["state"] for k in ("exp_avg", "exp_avg_sq"))
    assert all(int(o2["state"][i]["step"]) == 3 for i in o2["state"])
    print(f"FSDP2 2 processes vs 1 process, batch x2: loss max rel diff {loss_diff:.2e}, "
          f"adapter max |diff| {parity:.2e}, checkpoint weights {ckpt:.2e}, Adam moments "
          f"{moments:.2e}")
    assert loss_diff <= 1e-5
    assert parity <= PARITY_ATOL and ckpt <= PARITY_ATOL and moments <= PARITY_ATOL


def test_resume_of_a_two_process_fsdp_run_is_exact(toy_model_dir, tmp_path, one_thread,
                                                    monkeypatch):
    spec = {"base": str(toy_model_dir), "root": str(tmp_path)}
    # What `accelerate launch` with an FSDP config sets: it selects FSDP2 (no --fsdp given).
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    p = torchrun(__file__, "resume", json.dumps(spec))
    assert p.stderr.count("resumed from") == 1 and "(step 3," in p.stderr
    assert "FSDP2 over gloo" in p.stderr and "accelerate is configured for FSDP" in p.stderr
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ha, hb = report(straight)["history"], report(resumed)["history"]
    for curve in ("train_loss", "eval_loss"):
        assert [s for s, _ in ha[curve]] == [s for s, _ in hb[curve]]
        assert [x for _, x in ha[curve]] == pytest.approx([x for _, x in hb[curve]], rel=1e-6)
    assert [s for s, _ in ha["eval_loss"]] == [2, 4, 6]
    assert max_diff(weights(straight), weights(resumed)) <= 1e-6
    em = report(straight)["metrics"]["exact_match"]
    assert em["n"] == 1 and len(em["samples"]) == 1
    hp = json.loads((resumed / "loraplex.json").read_text())["hyperparameters"]
    assert (hp["processes"], hp["distributed"]) == (2, "fsdp")


def test_fsdp_selection_and_what_it_refuses(quick_cfg, monkeypatch, one_thread):
    import argparse

    from loraplex.adapters.errors import ConfigError
    from loraplex.trainer import train_cli
    from loraplex.trainer.config import load_config, option_names
    from loraplex.trainer.distributed import engine_for, unsupported_launch
    from loraplex.trainer.train import run

    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers())
    for argv in (["--fsdp"], ["--distributed", "fsdp"]):
        args = parser.parse_args(["train", "--base", "b", "--data", "d", "--output", "o", *argv])
        overrides = {k: v for k, v in vars(args).items() if k in option_names()}
        assert load_config(None, overrides).distributed == "fsdp"
    assert load_config(None, {"base": "b", "data": ["d"], "output": "o"}).distributed == "ddp"

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert engine_for("ddp") == "ddp" and engine_for("fsdp") == "fsdp"
    # Without a launcher --fsdp changes nothing, and says so.
    logs: list[str] = []
    result = run(quick_cfg(distributed="fsdp", max_steps=1, eval_exact_match=0), log=logs.append)
    assert any("--fsdp has no effect without a launcher" in m for m in logs)
    assert "DDP over" not in "".join(logs) and "FSDP2 over" not in "".join(logs)
    hp = json.loads((Path(result["output"]) / "loraplex.json").read_text())["hyperparameters"]
    assert hp["processes"] == 1 and "distributed" not in hp
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert engine_for("ddp") == "fsdp"
    assert unsupported_launch("cpu", "fsdp") is None

    # QLoRA + FSDP: refused by the options, and for an accelerate FSDP launch at start.
    with pytest.raises(ConfigError, match="--quantize 4bit cannot be combined with --fsdp"):
        load_config(None, {"base": "b", "data": ["d"], "output": "o", "distributed": "fsdp",
                           "quantize": "4bit"})
    assert "--quantize 8bit cannot be combined with FSDP" in unsupported_launch("cuda", "fsdp",
                                                                                "8bit")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    assert "fsdp_offload_params (CPU offload) is not supported" in unsupported_launch("cpu",
                                                                                     "fsdp")


# -- the torchrun driver of test_resume_of_a_two_process_fsdp_run_is_exact ------------------------

def _resume_driver(spec: dict[str, str]) -> None:
    import torch.distributed as dist

    from loraplex.trainer.config import load_config
    from loraplex.trainer.train import Callback, run

    class CrashAfter(Callback):
        def on_step(self, t, logs):
            if t.state.step == 5:
                raise RuntimeError("simulated crash after step 5")

    dist.init_process_group("gloo")
    common = {**RESUME, "base": spec["base"], "data": [WORDS], "eval_data": [HELDOUT]}

    def quiet(msg: str) -> None:
        pass

    run(load_config(None, {**common, "output": f"{spec['root']}/straight",
                           "eval_exact_match": 1, "max_new_tokens": 4}))  # logs the start line
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
