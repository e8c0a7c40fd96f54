"""Malformed adapter files are refused with AdapterInvalid/AdapterIncompatible naming the file
and the field, never with another exception (a 500 on the admin upload route): JSON of the
wrong shape, NaN/Infinity, deep nesting, odd safetensors header entries, non-ASCII digits in
tensor names; and the same under `python -O`, where an `assert` would vanish.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from loraplex.adapters.errors import AdapterIncompatible, AdapterInvalid
from loraplex.adapters.registry import Registry
from loraplex.adapters.validate import validate_adapter_dir

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _write(name: str, content: str | bytes) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        p = d / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return edit


def _config(**changes: object) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        cfg = json.loads((d / CONFIG).read_text())
        cfg.update(changes)
        (d / CONFIG).write_text(json.dumps(cfg))  # NaN/Infinity are written as JSON allows them
    return edit


def _header(edit_header: Callable[[dict], dict | bytes]) -> Callable[[Path], None]:
    """Rewrite the safetensors header (JSON), keeping the tensor data as is."""
    def edit(d: Path) -> None:
        p = d / WEIGHTS
        raw = p.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        new = edit_header(json.loads(raw[8:8 + n]))
        blob = new if isinstance(new, bytes) else json.dumps(new).encode()
        p.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    return edit


def _set_entry(key: str, **fields: object) -> Callable[[dict], dict]:
    def edit(h: dict) -> dict:
        h[key] = {**h[key], **fields}
        return h
    return edit


def _rename_layer(old: str, new: str) -> Callable[[dict], dict]:
    def edit(h: dict) -> dict:
        return {k.replace(f".layers.{old}.", f".layers.{new}."): v for k, v in h.items()}
    return edit


# id -> (edit(adapter dir), expected exception type, message fragment)
CASES: dict[str, tuple[Callable[[Path], None], type, str]] = {
    # adapter_config.json that is JSON but not an object (was `assert isinstance`: a 500 under -O)
    "config-list": (_write(CONFIG, "[]"), AdapterInvalid,
                    "adapter_config.json: file: is a list, not a JSON object"),
    "config-string": (_write(CONFIG, '"LORA"'), AdapterInvalid,
                      "adapter_config.json: file: is a string, not a JSON object"),
    "config-null": (_write(CONFIG, "null"), AdapterInvalid,
                    "adapter_config.json: file: is null, not a JSON object"),
    "config-number": (_write(CONFIG, "4"), AdapterInvalid,
                      "adapter_config.json: file: is a number, not a JSON object"),
    "config-not-json": (_write(CONFIG, "{"), AdapterInvalid,
                        "adapter_config.json: file: not valid UTF-8 JSON"),
    "config-not-utf8": (_write(CONFIG, b"\xff\xfe{}"), AdapterInvalid,
                        "adapter_config.json: file: not valid UTF-8 JSON"),
    "config-deep": (_write(CONFIG, "[" * 200_000 + "]" * 200_000), AdapterInvalid,
                    "adapter_config.json: file: JSON nested too deeply"),
    "config-huge-int": (_write(CONFIG, '{"r": 1' + "0" * 5000 + "}"), AdapterInvalid,
                        "adapter_config.json: file: not valid UTF-8 JSON"),
    # fields of the wrong shape
    "alpha-nan": (_config(lora_alpha=float("nan")), AdapterInvalid,
                  "lora_alpha: nan must be a positive number"),
    "alpha-inf": (_config(lora_alpha=float("inf")), AdapterInvalid,
                  "lora_alpha: inf must be a positive number"),
    "alpha-string": (_config(lora_alpha="8"), AdapterInvalid,
                     "lora_alpha: '8' must be a positive number"),
    "r-float": (_config(r=4.0), AdapterInvalid, "r: rank 4.0 is not allowed"),
    "r-bool": (_config(r=True), AdapterInvalid, "r: rank True is not allowed"),
    "rank-pattern-list": (_config(rank_pattern=[4]), AdapterInvalid,
                          "rank_pattern: [4] must map module patterns to ranks"),
    "rank-pattern-str-rank": (_config(rank_pattern={"q_proj": "4"}), AdapterInvalid,
                              "rank_pattern: {'q_proj': '4'} must map"),
    "targets-object": (_config(target_modules={"q_proj": 1}), AdapterInvalid,
                       "target_modules: {'q_proj': 1} must be a non-empty list"),
    "targets-mixed": (_config(target_modules=["q_proj", 3]), AdapterInvalid,
                      "target_modules: ['q_proj', 3] must be a non-empty list"),
    # loraplex.json (written by the trainer) of the wrong shape
    "loraplex-list": (_write("loraplex.json", "[1]"), AdapterInvalid,
                      "loraplex.json: file: is a list, not a JSON object"),
    "loraplex-fingerprint-list": (_write("loraplex.json", '{"base_fingerprint": ["x"]}'),
                                  AdapterInvalid, "base_fingerprint: is a list, must be a string"),
    "loraplex-template-number": (_write("loraplex.json", '{"chat_template": 5}'), AdapterInvalid,
                                 "chat_template: is a number, must be a string"),
    "loraplex-stops-string": (_write("loraplex.json", '{"stop_tokens": "</s>"}'), AdapterInvalid,
                              "stop_tokens: must be a list of strings"),
    # tokenizer files of the wrong shape (read for the adapter's own template / stop tokens)
    "tokenizer-config-list": (_write("tokenizer_config.json", "[]"), AdapterInvalid,
                              "tokenizer files: json:"),
    "tokenizer-model-list": (
        lambda d: (_write("generation_config.json", '{"eos_token_id": 1}')(d),
                   _write("tokenizer.json", '{"model": [1]}')(d)),
        AdapterInvalid, "tokenizer files: json: malformed"),
    # safetensors header entries
    "header-list": (_header(lambda h: b"[]"), AdapterInvalid, "header JSON is not an object"),
    "header-deep": (_header(lambda h: b"[" * 200_000 + b"]" * 200_000), AdapterInvalid,
                    "corrupt safetensors header: JSON nested too deeply"),
    "entry-not-object": (_header(lambda h: {**h, Q_A: [1, 2]}), AdapterInvalid,
                         f"entry {Q_A!r} is not an object"),
    "shape-string": (_header(_set_entry(Q_A, shape="4,64")), AdapterInvalid,
                     "has invalid shape '4,64'"),
    "shape-str-dims": (_header(_set_entry(Q_A, shape=[4, "64"])), AdapterInvalid,
                       "has invalid shape [4, '64']"),
    "shape-negative": (_header(_set_entry(Q_A, shape=[-4, -64])), AdapterInvalid,
                       "has invalid shape [-4, -64]"),
    "shape-bool": (_header(_set_entry(Q_A, shape=[True, 64])), AdapterInvalid,
                   "has invalid shape [True, 64]"),
    "shape-1d": (_header(_set_entry(Q_A, shape=[256])), AdapterInvalid,
                 "shape [256] is not 2-D"),
    "shape-float": (_header(_set_entry(Q_A, shape=[4.0, 64.0])), AdapterInvalid,
                    "has invalid shape [4.0, 64.0]"),
    "dtype-unknown": (_header(_set_entry(Q_A, dtype="F128")), AdapterInvalid,
                      "unknown dtype 'F128'"),
    "dtype-int": (_header(_set_entry(Q_A, dtype="I32")), AdapterInvalid,
                  "dtype I32 (expected F16, BF16 or F32)"),
    "offsets-floats": (_header(_set_entry(Q_A, data_offsets=[0.0, 1024.0])), AdapterInvalid,
                       "data_offsets [0.0, 1024.0] outside the file"),
    "offsets-one": (_header(_set_entry(Q_A, data_offsets=[0])), AdapterInvalid,
                    "data_offsets [0] outside the file"),
    # A layer index in other digits: \d and int() read '٠' as 0, but vLLM has no such module.
    "layer-arabic-indic": (_header(_rename_layer("0", "٠")), AdapterIncompatible,
                           "layers.٠.self_attn.q_proj' is not a linear layer of base 'tiny'"),
    "layer-fullwidth": (_header(_rename_layer("1", "１")), AdapterIncompatible,
                        "layers.１.self_attn.q_proj' is not a linear layer of base 'tiny'"),
    "layer-leading-zero": (_header(_rename_layer("1", "01")), AdapterIncompatible,
                           "layers.01.self_attn.q_proj' is not a linear layer of base 'tiny'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_adapter_refused_cleanly(case: str, local_registry: Registry,
                                           adapter_copy: Callable[..., Path]) -> None:
    edit, exc_type, fragment = CASES[case]
    d = adapter_copy()
    edit(d)
    with pytest.raises(AdapterInvalid) as info:  # AdapterIncompatible is a subclass
        validate_adapter_dir(d, local_registry.get_base("tiny"), max_rank=64, max_bytes=1 << 30)
    err = info.value
    assert type(err) is exc_type, err.message
    assert fragment in err.message, err.message
    assert err.problems and all("fix:" in p for p in err.problems), err.problems


@pytest.mark.parametrize("declared", [
    "~no-such-user-loraplex/model",  # Path.expanduser() raises RuntimeError
    "bad\x00path",                   # NUL: ValueError from the OS layer
    "x" * 5000,                      # ENAMETOOLONG: OSError from is_dir()
    "/",                             # a directory that is no model
])
def test_odd_declared_base_path_is_not_an_error(declared: str, local_registry: Registry,
                                                adapter_copy: Callable[..., Path]) -> None:
    # base_model_name_or_path is only a hint: a string that names no readable base is ignored.
    d = adapter_copy()
    _config(base_model_name_or_path=declared)(d)
    s = validate_adapter_dir(d, local_registry.get_base("tiny"), max_rank=64, max_bytes=1 << 30)
    assert s.rank == 4


def test_odd_safetensors_metadata_block_is_ignored(local_registry: Registry,
                                                   adapter_copy: Callable[..., Path]) -> None:
    d = adapter_copy()
    _header(lambda h: {**h, "__metadata__": {"format": "pt", "note": "x" * 1000}})(d)
    s = validate_adapter_dir(d, local_registry.get_base("tiny"), max_rank=64, max_bytes=1 << 30)
    assert s.rank == 4


def test_refusals_hold_under_python_O(local_registry: Registry,
                                      adapter_copy: Callable[..., Path]) -> None:
    """`python -O` strips asserts: the checks must not be asserts."""
    dirs = []
    for case in ("config-list", "config-null", "loraplex-list"):
        d = adapter_copy()
        CASES[case][0](d)
        dirs.append(str(d))
    code = """
import json, sys
from loraplex.adapters.errors import AdapterInvalid
from loraplex.adapters.records import BaseModelRecord
from loraplex.adapters.validate import validate_adapter_dir
assert False, "not reached under -O"
base = BaseModelRecord.model_validate_json(sys.argv[1])
out = []
for d in sys.argv[2:]:
    try:
        validate_adapter_dir(d, base, 64, 1 << 30)
        out.append("accepted")
    except AdapterInvalid as exc:
        out.append(exc.message)
print(json.dumps(out))
"""
    base = local_registry.get_base("tiny").model_dump_json()
    r = subprocess.run([sys.executable, "-O", "-c", code, base, *dirs], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    msgs = json.loads(r.stdout.strip().splitlines()[-1])
    assert "adapter_config.json: file: is a list, not a JSON object" in msgs[0]
    assert "adapter_config.json: file: is null, not a JSON object" in msgs[1]
    assert "loraplex.json: file: is a list, not a JSON object" in msgs[2]
