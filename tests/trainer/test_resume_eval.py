"""Resume across a step that is both an eval step and a checkpoint step.

The checkpoint of such a step must hold that step's eval (loss history, best weights, early-stopping
counter): a run interrupted right after it and resumed ends exactly like an uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.trainer.train import Callback, run


class CrashAfter(Callback):
    """Interrupts the run right after step `step` is complete (its eval and checkpoint done)."""

    def __init__(self, step: int):
        self.step = step

    def on_step(self, t, logs):
        if t.state.step == self.step:
            raise RuntimeError(f"simulated crash after step {self.step}")


def _report(out: str) -> dict:
    return json.loads((Path(out) / "report.json").read_text())


def test_resume_after_an_eval_and_checkpoint_step_matches_an_uninterrupted_run(quick_cfg,
                                                                                 tmp_path):
    import torch
    from safetensors.torch import load_file

    # Evals at 2, 4, 6, 8; min_delta 100 makes every eval after the first a non-improvement, so
    # with patience 2 the run stops at step 6 with the best weights of step 2. Checkpoints at 2, 4,
    # 6; the interruption comes right after step 4, whose eval raised the counter to 1.
    common = dict(max_steps=8, eval_steps=2, save_steps=2, save_total_limit=5,
                  early_stopping_patience=2, early_stopping_min_delta=100.0, lora_dropout=0.1,
                  eval_exact_match=0, batch_size=3, lr_scheduler="linear", warmup_ratio=0.25)
    straight = run(quick_cfg(output=str(tmp_path / "straight"), **common), log=lambda m: None)

    cfg = quick_cfg(output=str(tmp_path / "resumed"), **common)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg, callbacks=[CrashAfter(4)], log=lambda m: None)
    ckpt = cfg.work_dir / "checkpoints" / "step-0000004"
    saved = json.loads((ckpt / "state.json").read_text())["state"]

    logs: list[str] = []
    resumed = run(cfg.model_copy(update={"resume": True}), log=logs.append)
    assert any("resumed from" in x and "step 4" in x for x in logs)

    ra, rb = _report(straight["output"]), _report(resumed["output"])
    ea, eb = ra["history"]["eval_loss"], rb["history"]["eval_loss"]
    assert [s for s, _ in ea] == [2, 4, 6]
    assert [s for s, _ in eb] == [2, 4, 6]
    for (_, la), (_, lb) in zip(ea, eb):
        assert la == pytest.approx(lb, rel=1e-5)
    for key in ("steps", "best_step", "stopped_early"):
        assert ra["metrics"][key] == rb["metrics"][key], key
    assert (ra["metrics"]["steps"], ra["metrics"]["best_step"]) == (6, 2)
    assert ra["metrics"]["stopped_early"] is True
    assert rb["metrics"]["best_eval_loss"] == pytest.approx(ra["metrics"]["best_eval_loss"],
                                                            rel=1e-5)
    progress = [json.loads(x) for x in (Path(resumed["output"]) / "progress.jsonl")
                .read_text().splitlines()]
    assert [r["step"] for r in progress if r["event"] == "eval"] == [2, 4, 6]

    a = load_file(str(Path(straight["output"]) / "adapter_model.safetensors"))
    b = load_file(str(Path(resumed["output"]) / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    # the cause: the step-4 checkpoint holds the step-4 eval and the counter it raised
    assert [s for s, _ in saved["eval_loss"]] == [2, 4]
    assert saved["evals_without_improvement"] == 1 and saved["best_step"] == 2
