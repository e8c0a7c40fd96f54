"""TrainConfig: YAML mirrors the flags, flags override the file, bad options are ConfigErrors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from loraplex.adapters.errors import ConfigError
from loraplex.trainer.config import TrainConfig, add_arguments, load_config, option_names

BASE = {"base": "/models/toy", "data": ["d.jsonl"], "output": "out"}


def parse(argv: list[str]) -> dict:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return {k: v for k, v in vars(p.parse_args(argv)).items() if k in option_names()}


def test_every_field_has_a_flag_and_unset_flags_stay_absent():
    p = argparse.ArgumentParser()
    add_arguments(p)
    flags = {a.dest for a in p._actions}
    assert set(option_names()) <= flags
    assert parse([]) == {}


def test_yaml_then_cli_overrides(tmp_path: Path):
    f = tmp_path / "run.yaml"
    f.write_text("base: /models/toy\ndata: train.jsonl\noutput: out\nlr: 0.001\n"
                 "lora-r: 4\nregister: words\ntarget_modules: [q_proj, v_proj]\n"
                 "packing: true\n")
    cfg = load_config(f, parse(["--lr", "0.005", "--no-packing", "--alias", "canary",
                                "--data", "a.jsonl", "b.jsonl"]))
    assert cfg.lr == 0.005 and cfg.lora_r == 4 and cfg.packing is False
    assert cfg.data == ["a.jsonl", "b.jsonl"] and cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.register_name == "words" and cfg.alias == "canary"
    assert cfg.base == Path("/models/toy") and cfg.work_dir == Path("out.run")


def test_dumped_config_round_trips(tmp_path: Path):
    import yaml

    cfg = load_config(None, {**BASE, "register": "x", "alias": "y", "lora_r": 3})
    f = tmp_path / "dump.yaml"
    f.write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True)))
    assert load_config(f) == cfg


@pytest.mark.parametrize("over, match", [
    ({"lora_r": 0}, "rank 0 is not allowed"),
    ({"use_dora": True}, "cannot serve DoRA"),
    ({"modules_to_save": ["lm_head"]}, "embeddings / lm_head"),
    ({"modules_to_save": ["model.embed_tokens"]}, "embeddings / lm_head"),
    ({"alias": "prod"}, "--alias needs --register"),
    ({"early_stopping_patience": 2}, "needs an eval set"),
    ({"eval_fraction": 1.5}, "--eval-fraction"),
    ({"lr": -1}, "--lr"),
    ({"bogus": 1}, "--bogus: unknown option"),
    ({"output": None}, "--output"),
])
def test_invalid_options(over, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, {**BASE, **over})


def test_missing_required_and_bad_yaml(tmp_path: Path):
    with pytest.raises(ConfigError, match="--base: missing") as exc:
        load_config(None, {"data": ["x"], "output": "o"})
    assert "--base" in exc.value.message
    f = tmp_path / "bad.yaml"
    f.write_text("lr: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
    f.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(f)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_unservable_allowed_explicitly():
    cfg = load_config(None, {**BASE, "use_dora": True, "modules_to_save": ["lm_head"],
                             "allow_unservable": True})
    assert cfg.use_dora and cfg.modules_to_save == ["lm_head"]


def test_inspect_needs_no_output():
    cfg = load_config(None, {"base": "b", "data": ["d"], "inspect": 2})
    assert cfg.output is None


def test_hyperparameters_exclude_paths_and_registry():
    hp = TrainConfig.model_validate({**BASE, "register": "x"}).hyperparameters()
    assert "lora_r" in hp and "lr" in hp and "chat_template" in hp
    assert not {"base", "data", "output", "register_name", "registry_url"} & set(hp)
