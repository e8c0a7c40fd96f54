"""Bad adapters are refused with their own message and leave nothing behind; good forms pass."""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from registry_workers import stored_files

from loraplex.adapters.errors import AdapterIncompatible, AdapterInvalid, BadRequest
from loraplex.adapters.registry import Registry
from loraplex.adapters.safetensors_header import HeaderError, read_header
from loraplex.adapters.validate import validate_adapter_dir

Models = dict[str, Path]


def _edit_config(d: Path, **changes: object) -> None:
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def _no_hub_base(d: Path) -> None:
    # A hub id (not a local dir) is not checked, isolating the tensor-shape problem.
    _edit_config(d, base_model_name_or_path="org/some-hub-model")


def _rewrite_header(d: Path, length: int | None = None, garble: bool = False) -> None:
    p = d / "adapter_model.safetensors"
    raw = bytearray(p.read_bytes())
    if length is not None:
        raw[:8] = struct.pack("<Q", length)
    if garble:
        raw[8:12] = b"\xff\xfe{{"
    p.write_bytes(bytes(raw))


# id -> (build(dir, models) -> push kwargs override, expected exception, message fragment)
CASES: dict[str, tuple[Callable[[Path, Models], dict], type, str]] = {
    "missing-config": (lambda d, m: (d / "adapter_config.json").unlink() or {},
                       AdapterInvalid, "adapter_config.json: file: missing"),
    "missing-weights": (lambda d, m: (d / "adapter_model.safetensors").unlink() or {},
                        AdapterInvalid, "adapter_model.safetensors: file: missing"),
    "pickle-weights": (
        lambda d, m: ((d / "adapter_model.safetensors").unlink(),
                      (d / "adapter_model.bin").write_bytes(pickle.dumps({"w": [1.0]})))
        and {},
        AdapterInvalid, "adapter_model.bin: file: pickle-based file refused"),
    "pickle-disguised": (lambda d, m: (d / "extra.dat").write_bytes(pickle.dumps([1])) and {},
                         AdapterInvalid, "extra.dat: file: pickle-based file refused"),
    "wrong-peft-type": (lambda d, m: _edit_config(d, peft_type="PREFIX_TUNING") or {},
                        AdapterInvalid, "peft_type: is 'PREFIX_TUNING', only 'LORA'"),
    "rank-over-limit": (lambda d, m: {"dir": m["adapter_r72"]},
                        AdapterIncompatible, "r: rank 72 exceeds the limit 64"),
    "rank-zero": (lambda d, m: _edit_config(d, r=0) or {},
                  AdapterInvalid, "r: rank 0 is not allowed"),
    "unknown-target": (lambda d, m: _edit_config(d, target_modules=["q_proj", "foo_proj"]) or {},
                       AdapterIncompatible, "'foo_proj' is not a linear module of base 'tiny'"),
    "bad-target-regex": (lambda d, m: _edit_config(d, target_modules="(q_proj") or {},
                         AdapterInvalid, "regex '(q_proj' does not compile"),
    "shape-mismatch": (lambda d, m: _no_hub_base(d) or {},
                       AdapterIncompatible, "shape [4, 96] but base 'tiny' with r=4 needs [4, 64]"),
    "wrong-base-declared": (
        lambda d, m: (d / "loraplex.json").write_text(json.dumps(
            {"base_fingerprint": "sha256:" + "0" * 64})) and {},
        AdapterIncompatible, "loraplex.json: base_fingerprint: adapter was trained on base "
                             "sha256:0000"),
    "wrong-base-dir": (lambda d, m: _edit_config(d, base_model_name_or_path=str(m["retok"])) or {},
                       AdapterIncompatible, "base_model_name_or_path: "),
    "corrupt-header-length": (lambda d, m: _rewrite_header(d, length=1 << 40) or {},
                              AdapterInvalid, "corrupt safetensors header: header length field"),
    "corrupt-header-json": (lambda d, m: _rewrite_header(d, garble=True) or {},
                            AdapterInvalid, "corrupt safetensors header: header is not valid"),
    "truncated-weights": (
        lambda d, m: os.truncate(d / "adapter_model.safetensors",
                                 (d / "adapter_model.safetensors").stat().st_size - 100) or {},
        AdapterInvalid, "outside the file"),
    "dora": (lambda d, m: _edit_config(d, use_dora=True) or {},
             AdapterInvalid, "use_dora: DoRA adapters cannot be served"),
    "modules-to-save": (lambda d, m: _edit_config(d, modules_to_save=["lm_head"]) or {},
                        AdapterInvalid, "modules_to_save: ['lm_head']"),
    "size-limit": (lambda d, m: {"max_adapter_bytes": 1000},
                   AdapterIncompatible, "bytes exceeds the limit 1000"),
    "symlink-outside": (lambda d, m: os.symlink("/etc/hostname", d / "evil.txt") or {},
                        AdapterInvalid, "evil.txt: file: symlink pointing outside"),
    "traversal-file-name": (lambda d, m: (d / "x\\..\\..\\evil.txt").write_text("x") and {},
                            AdapterInvalid, "not a safe relative file name"),
    "traversal-name": (lambda d, m: {"name": "../evil"}, BadRequest, "invalid name '../evil'"),
    "slash-name": (lambda d, m: {"name": "team/bot"}, BadRequest, "invalid name 'team/bot'"),
    "traversal-alias": (lambda d, m: {"alias": "../prod"}, BadRequest, "invalid alias '../prod'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_adapter_refused(case: str, make_registry: Callable[..., Registry],
                             adapter_copy: Callable[..., Path], models: Models) -> None:
    build, exc_type, fragment = CASES[case]
    src = adapter_copy("adapter_wide" if case == "shape-mismatch" else "adapter")
    kw = build(src, models)
    reg = make_registry(max_adapter_bytes=kw.pop("max_adapter_bytes", 1 << 30))
    rev = reg.revision()
    push = {"dir": src, "name": "bot", **kw}
    with pytest.raises(exc_type) as info:
        reg.push(push.pop("dir"), push.pop("name"), **push)
    err = info.value
    assert type(err) is exc_type, err.message
    assert fragment in err.message, err.message
    if isinstance(err, AdapterInvalid):
        assert err.problems and all("fix:" in p for p in err.problems), err.problems
    # Nothing left behind: no version row, no revision bump, no artifact file.
    assert reg.list(include_archived=True) == []
    assert reg.revision() == rev
    assert stored_files(reg) == []


def test_all_problems_reported_together(make_registry: Callable[..., Registry],
                                        adapter_copy: Callable[..., Path]) -> None:
    d = adapter_copy()
    _edit_config(d, peft_type="IA3", use_dora=True, target_modules=["nope_proj"])
    (d / "optimizer.pt").write_bytes(b"x")
    with pytest.raises(AdapterInvalid) as info:
        make_registry().push(d, "bot")
    msg = info.value.message
    for fragment in ("peft_type", "use_dora", "'nope_proj'", "optimizer.pt"):
        assert fragment in msg
    assert len(info.value.problems) == 4


@pytest.mark.parametrize("backend", ["sqlite-local", pytest.param("sqlite-s3",
                                                                   marks=pytest.mark.s3)])
def test_failure_after_upload_leaves_nothing(backend: str, make_registry: Callable[..., Registry],
                                             adapter_copy: Callable[..., Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    reg = make_registry(backend)

    def boom(*a: object, **k: object) -> None:
        assert len(stored_files(reg)) == 4  # files + manifest were uploaded
        raise RuntimeError("database went away")

    monkeypatch.setattr(reg, "_commit_push", boom)
    with pytest.raises(RuntimeError):
        reg.push(adapter_copy(), "bot")
    assert stored_files(reg) == []
    assert reg.list(include_archived=True) == []


@pytest.mark.parametrize("targets", [
    "all-linear",
    r"model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)|.*mlp\.(gate|up|down)_proj",
    ["self_attn.q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    # what PEFT saves for `all-linear` on a base with few layers: full module paths
    [f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                     "mlp.down_proj")],
])
def test_target_module_forms(targets: object, local_registry: Registry,
                             adapter_copy: Callable[..., Path]) -> None:
    d = adapter_copy("adapter_all")
    _edit_config(d, target_modules=targets)
    s = validate_adapter_dir(d, local_registry.get_base("tiny"), max_rank=64, max_bytes=1 << 30)
    assert s.rank == 2 and len(s.target_modules) == 7
    assert set(s.files) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}


def test_rank_pattern_checked_against_tensors(local_registry: Registry,
                                              adapter_copy: Callable[..., Path]) -> None:
    d = adapter_copy()
    _edit_config(d, rank_pattern={"q_proj": 8})  # tensors are r=4 everywhere
    with pytest.raises(AdapterIncompatible) as info:
        validate_adapter_dir(d, local_registry.get_base("tiny"), 64, 1 << 30)
    assert "q_proj.lora_A.weight: shape [4, 64] but base 'tiny' with r=8" in info.value.message
    assert "v_proj" not in info.value.message


def test_safetensors_header_reader(models: Models, tmp_path: Path) -> None:
    header = read_header(models["adapter"] / "adapter_model.safetensors")
    a = header["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert a.shape == (4, 64) and a.dtype == "F32"
    for data, fragment in [(b"\x01\x02", "shorter than"),
                           (struct.pack("<Q", 3) + b"[1]", "not an object"),
                           (struct.pack("<Q", 2) + b"{}", None)]:
        p = tmp_path / "x.safetensors"
        p.write_bytes(data)
        if fragment is None:
            assert read_header(p) == {}
        else:
            with pytest.raises(HeaderError, match=fragment):
                read_header(p)
