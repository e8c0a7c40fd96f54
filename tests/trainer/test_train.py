"""End-to-end runs on the toy base (a few steps each): outputs, parity, resume, CLI, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.adapters.chat import IGNORE_INDEX, load_tokenizer, render
from loraplex.adapters.cli import main
from loraplex.trainer.train import Callback, run

from .conftest import DATA, qa_rows


def leftovers(parent: Path) -> list[str]:
    """Hidden staging/backup dirs a run must never leave behind."""
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def lora_weights(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


class CrashAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step(self, t, logs):
        if t.state.step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


def test_run_writes_a_complete_adapter(quick_cfg, toy_model_dir, tmp_path):
    from loraplex.adapters.fingerprint import fingerprint_base, inspect_base
    from loraplex.adapters.validate import validate_adapter_dir

    cfg = quick_cfg(eval_steps=2)
    result = run(cfg, log=lambda m: None)
    out = Path(result["output"])
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja",
            "loraplex.json", "report.json", "loss.png", "progress.jsonl", "rejected.jsonl",
            "train_config.yaml"} <= names
    m = json.loads((out / "loraplex.json").read_text())
    assert m["base_fingerprint"] == fingerprint_base(toy_model_dir)
    assert m["chat_template"] == (out / "chat_template.jinja").read_text()
    assert m["stop_tokens"] == ["<|im_end|>"]
    assert m["data"]["train"] == 111 and m["data"]["eval"] == 27 and m["data"]["dropped"] == 0
    assert m["data"]["data_sha256"].startswith("sha256:")
    assert m["hyperparameters"]["lora_r"] == 4 and m["metrics"]["steps"] == 4
    em = m["metrics"]["exact_match"]
    assert em["n"] == 4 and 0 <= em["base"] <= 1 and 0 <= em["adapter"] <= 1
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recs = [json.loads(x) for x in (out / "progress.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["event"] == "train"]
    assert [r["step"] for r in train_recs] == [2, 4]
    assert {"step", "loss", "lr", "tokens_per_s", "eta_s", "epoch"} <= set(train_recs[0])
    assert [r["step"] for r in recs if r["event"] == "eval"] == [2, 4]
    report = json.loads((out / "report.json").read_text())
    assert len(report["history"]["train_loss"]) == 4
    # The registry's validator accepts it against the base it was trained on.
    summary = validate_adapter_dir(out, inspect_base("toy", toy_model_dir), 64, 1 << 30)
    assert summary.rank == 4 and summary.stop_tokens == ["<|im_end|>"]
    assert not cfg.work_dir.exists() and not leftovers(out.parent)


def test_parity_trainer_prompt_ids_equal_server_ids(quick_cfg, toy_model_dir, write_jsonl):
    """The prompt ids the trainer trained on == what the server renders for the same adapter."""
    from loraplex.adapters.fingerprint import inspect_base
    from loraplex.adapters.validate import validate_adapter_dir
    from loraplex.trainer.dataset import prepare_data

    conv = {"conversations": [{"from": "system", "value": "You answer with the result only."},
                              {"from": "human", "value": "Reverse the list: cat, dog"},
                              {"from": "gpt", "value": "dog, cat"},
                              {"from": "human", "value": "Sort these colors: red, blue"},
                              {"from": "gpt", "value": "blue, red"}]}
    f = write_jsonl("chat.jsonl", [conv])
    for template in ("llama2", "alpaca"):
        cfg = quick_cfg(data=[str(f)], eval_data=[], chat_template=template, max_steps=1,
                        eval_exact_match=0, output=str(f.parent / f"a-{template}"))
        out = Path(run(cfg, log=lambda m: None)["output"])
        # Trainer side: the example exactly as it was trained.
        tok = load_tokenizer(toy_model_dir)
        trainer_tpl = json.loads((out / "loraplex.json").read_text())["chat_template"]
        ex = prepare_data(cfg, tok, trainer_tpl).train[0]
        # Server side: the template and stops the registry reads from the adapter directory.
        summary = validate_adapter_dir(out, inspect_base("toy", toy_model_dir), 64, 1 << 30)
        msgs = ex.messages
        for k in (2, 4):  # before the first and the second answer
            served = render(summary.chat_template, msgs[:k], tok, add_generation_prompt=True)
            prompt_len = len(served.token_ids)
            assert ex.input_ids[:prompt_len] == served.token_ids
            assert ex.labels[prompt_len - 1] == IGNORE_INDEX and ex.labels[prompt_len] != IGNORE_INDEX
        stop_ids = [tok.token_to_id(s) for s in summary.stop_tokens]
        assert stop_ids == tok.stop_token_ids(summary.chat_template)
        labelled_ends = [ex.input_ids[i] for i in range(len(ex.labels) - 1)
                         if ex.labels[i] != IGNORE_INDEX and ex.labels[i + 1] == IGNORE_INDEX]
        assert labelled_ends and all(t in stop_ids for t in labelled_ends)


def test_resume_restores_optimizer_scheduler_rng_and_data_position(quick_cfg, tmp_path):
    import torch

    common = dict(max_steps=6, lora_dropout=0.2, eval_exact_match=0, batch_size=3,
                  grad_accum=2, lr_scheduler="linear", warmup_ratio=0.3)
    straight = run(quick_cfg(output=str(tmp_path / "straight"), **common), log=lambda m: None)

    cfg = quick_cfg(output=str(tmp_path / "resumed"), save_steps=3, **common)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg, callbacks=[CrashAt(5)], log=lambda m: None)
    assert not cfg.output.exists() and not leftovers(tmp_path)  # no partial adapter
    assert sorted(p.name for p in (cfg.work_dir / "checkpoints").iterdir()) == ["step-0000003"]

    logs: list[str] = []
    resumed = run(cfg.model_copy(update={"resume": True}), log=logs.append)
    assert any("resumed from" in x and "step 3" in x for x in logs)
    a = lora_weights(Path(straight["output"]))
    b = lora_weights(Path(resumed["output"]))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    hist_a = json.loads((Path(straight["output"]) / "report.json").read_text())["history"]
    hist_b = json.loads((Path(resumed["output"]) / "report.json").read_text())["history"]
    assert [s for s, _ in hist_b["train_loss"]] == [1, 2, 3, 4, 5, 6]
    for (_, la), (_, lb) in zip(hist_a["train_loss"], hist_b["train_loss"]):
        assert la == pytest.approx(lb, rel=1e-5)


def test_resume_refuses_changed_options(quick_cfg):
    cfg = quick_cfg(max_steps=4, save_steps=2, eval_exact_match=0)
    with pytest.raises(RuntimeError):
        run(cfg, callbacks=[CrashAt(3)], log=lambda m: None)
    from loraplex.adapters.errors import ConfigError

    with pytest.raises(ConfigError, match="different lr"):
        run(cfg.model_copy(update={"resume": True, "lr": 0.5}), log=lambda m: None)


def test_early_stopping_keeps_the_best_weights(quick_cfg, tmp_path):
    import torch

    # min_delta 100: no later eval counts as an improvement, so it stops after the second eval
    # and restores the weights of step 1.
    res = run(quick_cfg(max_steps=6, eval_steps=1, early_stopping_patience=1,
                        early_stopping_min_delta=100.0, eval_exact_match=0), log=lambda m: None)
    m = res["metrics"]
    assert m["stopped_early"] and m["steps"] == 2 and m["best_step"] == 1
    one = run(quick_cfg(max_steps=1, eval_exact_match=0, output=str(tmp_path / "one")),
              log=lambda m: None)
    a, b = lora_weights(Path(res["output"])), lora_weights(Path(one["output"]))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_packed_and_padded_batches_give_the_same_loss(quick_cfg, toy_model_dir):
    import torch

    from loraplex.adapters.chat import resolve_template
    from loraplex.trainer.dataset import collate, prepare_data
    from loraplex.trainer.model import load_model
    from loraplex.trainer.train import LoraTrainer

    cfg = quick_cfg(train_on_inputs=True)
    tok = load_tokenizer(toy_model_dir)
    data = prepare_data(cfg, tok, resolve_template(None, toy_model_dir))
    model = load_model(cfg.base, cfg)
    t = LoraTrainer(cfg, model, data.train, [], 1, cfg.work_dir, {})
    exs = data.train[:5]
    with torch.no_grad():
        lp, np_ = t._loss_sum(collate(exs, 1, packing=True))
        lq, nq = t._loss_sum(collate(exs, 1, packing=False))
    assert np_ == nq and float(lp) == pytest.approx(float(lq), rel=1e-4)


def test_packing_run(quick_cfg):
    res = run(quick_cfg(packing=True, max_steps=2, eval_exact_match=0), log=lambda m: None)
    assert res["metrics"]["steps"] == 2 and res["metrics"]["eval_loss"] > 0


# -- the command line ----------------------------------------------------------------------------

def cli(*args: str) -> int:
    return main(["train", *args])


def test_cli_inspect_prints_tokens_with_labels(toy_model_dir, capsys):
    rc = cli("--base", str(toy_model_dir), "--data", str(DATA / "numbers.openai.jsonl"),
             "--inspect", "2")
    out = capsys.readouterr()
    assert rc == 0
    assert out.out.count("== ") == 2 and '"<|im_start|>"' in out.out
    assert "trained text:" in out.out and "<|im_end|>" in out.out
    assert "data: 156 rows" in out.err


def test_cli_yaml_config_register_and_alias(toy_model_dir, tmp_path, capsys):
    from loraplex.adapters.registry import Registry

    db, store = f"sqlite:///{tmp_path / 'reg.db'}", str(tmp_path / "artifacts")
    conf = tmp_path / "run.yaml"
    conf.write_text(f"base: {toy_model_dir}\ndata: {DATA / 'numbers.openai.jsonl'}\n"
                    f"eval-fraction: 0.1\nmax_steps: 2\nbatch_size: 4\nlora_r: 4\n"
                    f"progress_bar: false\neval_exact_match: 2\nmax_new_tokens: 4\n"
                    f"registry_url: {db}\nartifacts_url: {store}\n")
    rc = cli("--config", str(conf), "--output", str(tmp_path / "num"), "--register", "numbers",
             "--alias", "canary", "--chat-template", "alpaca", "--json")
    out = capsys.readouterr()
    assert rc == 0, out.err
    result = json.loads(out.out)
    assert result["registered"] == "numbers@1"
    with Registry(db, store) as reg:
        v = reg.resolve("numbers:canary")
        assert v.version == 1 and v.rank == 4
        assert v.chat_template == (tmp_path / "num" / "chat_template.jinja").read_text()
        assert "### Response:" in v.chat_template and v.stop_tokens == ["<|im_end|>"]
        assert v.training["hyperparameters"]["chat_template"] == "alpaca"
        assert v.metrics["steps"] == 2
        assert [b.name for b in reg.list_bases()] == [toy_model_dir.name.lower()[:64]]


def test_cli_print_config(tmp_path, capsys):
    rc = cli("--base", "b", "--data", "d.jsonl", "--output", "o", "--lora-r", "3",
             "--register", "x", "--print-config")
    out = capsys.readouterr().out
    assert rc == 0 and "lora_r: 3" in out and "register: x" in out


def _bad(capsys, tmp_path: Path, *args: str) -> str:
    rc = cli(*args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.run").exists()
    assert not leftovers(tmp_path)
    return err


def test_bad_input_malformed_json_line_37(toy_model_dir, write_jsonl, tmp_path, capsys):
    rows: list = qa_rows(40)
    rows[36] = '{"messages": [{"role": "user", "content": "q"}'
    f = write_jsonl("data.jsonl", rows)
    err = _bad(capsys, tmp_path, "--base", str(toy_model_dir), "--data", str(f), "--output",
               str(tmp_path / "out"), "--strict")
    assert f"error: --strict: 1 row(s) rejected:\n  {f}:37: bad JSON" in err


def test_bad_input_unknown_role(toy_model_dir, write_jsonl, tmp_path, capsys):
    rows = qa_rows(3) + [{"conversations": [{"from": "human", "value": "q"},
                                            {"from": "wizard", "value": "r"}]}]
    f = write_jsonl("data.jsonl", rows)
    err = _bad(capsys, tmp_path, "--base", str(toy_model_dir), "--data", str(f), "--output",
               str(tmp_path / "out"), "--strict")
    assert f"{f}:4: unknown role 'wizard' in conversations[1].from" in err


def test_bad_input_empty_dataset(toy_model_dir, write_jsonl, tmp_path, capsys):
    f = write_jsonl("data.jsonl", [])
    err = _bad(capsys, tmp_path, "--base", str(toy_model_dir), "--data", str(f), "--output",
               str(tmp_path / "out"))
    assert "error: no training examples left: 0 row(s) read" in err


def test_bad_input_unwritable_output(toy_model_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    err = _bad(capsys, tmp_path, "--base", str(toy_model_dir), "--data",
               str(DATA / "numbers.openai.jsonl"), "--output", str(blocker / "out"))
    assert "error: output directory" in err and "is not writable" in err
    assert blocker.read_text() == "not a directory"


def test_bad_input_rank_zero(toy_model_dir, tmp_path, capsys):
    err = _bad(capsys, tmp_path, "--base", str(toy_model_dir), "--data",
               str(DATA / "numbers.openai.jsonl"), "--output", str(tmp_path / "out"),
               "--lora-r", "0")
    assert "lora_r: rank 0 is not allowed; use a rank >= 1" in err


def test_existing_output_is_not_clobbered(toy_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = cli("--base", str(toy_model_dir), "--data", str(DATA / "numbers.openai.jsonl"),
             "--output", str(out))
    assert rc == 2 and "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_failure_while_writing_leaves_nothing(quick_cfg, tmp_path, monkeypatch):
    from loraplex.trainer import output

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(output, "plot_losses", boom)
    cfg = quick_cfg(max_steps=1, eval_exact_match=0)
    with pytest.raises(OSError, match="disk full"):
        run(cfg, log=lambda m: None)
    assert not cfg.output.exists() and not leftovers(cfg.output.parent)
