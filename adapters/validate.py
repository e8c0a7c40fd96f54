"""Validation of a PEFT LoRA directory against a registered base and the serving limits.

Used at push time by the registry and again by the server before it loads an adapter, so an
adapter that passes here is one vLLM can serve on that base. Nothing is imported from torch,
peft or safetensors: the weights file is checked through its header only.

All problems are collected and raised together, each naming the file, the field and the fix.
`AdapterIncompatible` means the adapter itself is fine but does not fit this base or these limits;
`AdapterInvalid` means the directory is not a servable LoRA at all.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from loraplex.adapters.adapter_format import (  # noqa: F401 - callers import CONFIG_FILE here
    CONFIG_FILE,
    LORAPLEX_FILE,
    TOOL_FORMATS,
    WEIGHTS_FILE,
)
from loraplex.adapters.errors import AdapterIncompatible, AdapterInvalid, ConfigError
from loraplex.adapters.fingerprint import fingerprint_base, read_chat_template, read_eos_tokens
from loraplex.adapters.records import AdapterSummary, BaseModelRecord
from loraplex.adapters.safetensors_header import HeaderError, read_header

# Formats whose loading can run arbitrary code (pickle, torch.save zips, joblib).
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"}
WEIGHT_DTYPES = {"F16", "BF16", "F32"}
# init_lora_weights values that leave a plain LoRA (others modify the base: PiSSA, OLoRA, LoftQ).
PLAIN_INITS = {"gaussian", "eva", "orthogonal", "mica", "lora_ga"}
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
# Errors a malformed JSON file can raise besides ValueError (JSONDecodeError, too many digits):
# deep nesting ([[[[...]]]]) exhausts the recursion limit.
_JSON_ERRORS = (UnicodeDecodeError, ValueError, RecursionError)
_SAFE_PART = re.compile(r"[A-Za-z0-9._+=@-][A-Za-z0-9 ._+=@-]*")
MAX_LISTED = 20  # cap repeated tensor problems so a wrong base yields a readable message


def safe_relpath(rel: str) -> bool:
    """True for a plain relative path (`a/b.json`): no `..`, no absolute, no odd characters."""
    parts = rel.split("/")
    return (
        0 < len(rel) <= 255
        and all(_SAFE_PART.fullmatch(p) and p not in (".", "..") for p in parts)
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_pickle(path: Path) -> bool:
    # Pickle protocol 2..5 starts with 0x80 <proto>; checked on every file, whatever its name.
    with path.open("rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _json_kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null", int: "a number", float: "a number"}.get(type(value), "a value")


def _read_json_object(path: Path, file: str, p: _Problems, fix: str) -> dict[str, Any] | None:
    """A JSON object file, or None with the problem recorded (never an assert: a 500 under -O)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        p.bad(file, "file", f"cannot be read ({exc.strerror or exc})", fix)
        return None
    except RecursionError:
        p.bad(file, "file", "JSON nested too deeply to parse", fix)
        return None
    except _JSON_ERRORS as exc:
        p.bad(file, "file", f"not valid UTF-8 JSON ({exc})", fix)
        return None
    if not isinstance(data, dict):
        p.bad(file, "file", f"is {_json_kind(data)}, not a JSON object", fix)
        return None
    return data


class _Problems:
    def __init__(self) -> None:
        self.invalid: list[str] = []
        self.incompatible: list[str] = []

    def bad(self, file: str, field: str, what: str, fix: str) -> None:
        self.invalid.append(f"{file}: {field}: {what}; fix: {fix}")

    def unfit(self, file: str, field: str, what: str, fix: str) -> None:
        self.incompatible.append(f"{file}: {field}: {what}; fix: {fix}")


def _list_files(d: Path, p: _Problems) -> dict[str, int]:
    """relpath -> size of every regular file (dotfiles skipped); traversal and pickles refused."""
    sizes: dict[str, int] = {}
    root = d.resolve()
    for dirpath, dirnames, filenames in os.walk(d, followlinks=False):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        for fname in sorted(filenames):
            if fname.startswith("."):
                continue
            path = Path(dirpath) / fname
            rel = path.relative_to(d).as_posix()
            if not safe_relpath(rel):
                p.bad(repr(rel), "file name", "not a safe relative file name (letters, digits, "
                      "' ._+=@-' only, no '..')", "rename or remove the file")
                continue
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                p.bad(rel, "file", "symlink pointing outside the adapter directory",
                      "replace it with a copy of the real file or remove it")
                continue
            if not path.is_file():
                p.bad(rel, "file", "not a regular file", "remove it")
                continue
            if path.suffix.lower() in PICKLE_SUFFIXES or _is_pickle(path):
                hint = " (training_args.bin/optimizer.pt are trainer state, not needed)"
                p.bad(rel, "file", "pickle-based file refused: loading it can execute code" + hint,
                      "delete it; save adapters with save_pretrained(safe_serialization=True)")
                continue
            sizes[rel] = path.stat().st_size
        for n in list(dirnames):
            if (Path(dirpath) / n).is_symlink() and not (Path(dirpath) / n).resolve().is_relative_to(root):
                p.bad((Path(dirpath) / n).relative_to(d).as_posix(), "directory",
                      "symlink pointing outside the adapter directory", "remove it")
                dirnames.remove(n)
    return sizes


def _check_config(cfg: dict[str, Any], base: BaseModelRecord, max_rank: int,
                  p: _Problems) -> tuple[int, float, set[str], dict[str, int]]:
    """Check adapter_config.json; return (r, alpha, targeted base suffixes, rank_pattern)."""
    f = CONFIG_FILE
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        p.bad(f, "peft_type", f"is {peft_type!r}, only 'LORA' can be served",
              "train a LoRA adapter (peft.LoraConfig)")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        p.bad(f, "r", f"rank {r!r} is not allowed (must be an integer >= 1)",
              "retrain with r between 1 and " + str(max_rank))
        r = 0
    rank_pattern = cfg.get("rank_pattern") or {}
    if not isinstance(rank_pattern, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in rank_pattern.values()
    ):
        p.bad(f, "rank_pattern", f"{rank_pattern!r} must map module patterns to ranks >= 1",
              "fix or remove rank_pattern")
        rank_pattern = {}
    top = max([r, *rank_pattern.values()])
    if top > max_rank:
        p.unfit(f, "r", f"rank {top} exceeds the limit {max_rank}",
                f"retrain with r <= {max_rank} or raise LORAPLEX_MAX_ADAPTER_RANK "
                "(and the server's max LoRA rank)")
    alpha = cfg.get("lora_alpha")
    # NaN and Infinity parse from JSON (json.loads accepts them) and pass `alpha > 0` checks.
    if (not isinstance(alpha, (int, float)) or isinstance(alpha, bool)
            or not math.isfinite(alpha) or alpha <= 0):
        p.bad(f, "lora_alpha", f"{alpha!r} must be a positive number", "set lora_alpha, e.g. 2*r")
        alpha = 0.0
    if cfg.get("use_dora"):
        p.bad(f, "use_dora", "DoRA adapters cannot be served by vLLM", "retrain with use_dora=False")
    if cfg.get("modules_to_save"):
        p.bad(f, "modules_to_save", f"{cfg['modules_to_save']!r}: fully trained modules cannot "
              "be served by vLLM", "retrain without modules_to_save")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        p.bad(f, "bias", "LoRA bias terms cannot be served by vLLM", "retrain with bias='none'")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in PLAIN_INITS:
        p.bad(f, "init_lora_weights", f"{init!r} modifies the base weights",
              "convert to a plain LoRA (PEFT path_initial_model_for_weight_conversion)")
    for key, what in (("layer_replication", "layer replication"), ("use_qalora", "QALoRA"),
                      ("alora_invocation_tokens", "activated LoRA"), ("use_bdlora", "BD-LoRA")):
        if cfg.get(key):
            p.bad(f, key, f"{what} cannot be served by vLLM", f"retrain without {key}")

    targets = cfg.get("target_modules")
    names = sorted(base.modules)
    known = ", ".join(names)
    found: set[str] = set()
    if targets == "all-linear":
        found = set(names)
    elif isinstance(targets, str) and targets:
        try:
            rx = re.compile(targets)
        except re.error as exc:
            p.bad(f, "target_modules", f"regex {targets!r} does not compile ({exc})",
                  "fix the regular expression")
            rx = None
        if rx is not None:
            found = {s for s in names for i in range(base.num_layers)
                     if rx.fullmatch(f"{base.layer_prefix}.{i}.{s}")}
            if not found:
                p.unfit(f, "target_modules", f"regex {targets!r} matches no linear module of base "
                        f"{base.name!r} (modules: {known})", "target modules the base has")
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        for t in targets:
            # "q_proj", "self_attn.q_proj", or a full path ("model.layers.0.self_attn.q_proj":
            # what PEFT writes for `all-linear` on a base with few layers)
            hit = {s for s in names if s == t or s.endswith("." + t) or t.endswith("." + s)}
            if not hit:
                p.unfit(f, "target_modules", f"{t!r} is not a linear module of base "
                        f"{base.name!r} (modules: {known})",
                        "push to the base it was trained on (--base) or retrain")
            found |= hit
    else:
        p.bad(f, "target_modules", f"{targets!r} must be a non-empty list of module names, a "
              "regex string or 'all-linear'", "set target_modules")
    return r, float(alpha), found, rank_pattern


def _rank_for(module: str, r: int, rank_pattern: dict[str, int]) -> int:
    # PEFT's rule (and vLLM's): first pattern matching a dotted suffix of the module name wins.
    for key, rank in rank_pattern.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return rank
        except re.error:
            continue
    return r


def _check_tensors(path: Path, base: BaseModelRecord, r: int, rank_pattern: dict[str, int],
                   p: _Problems) -> None:
    f = WEIGHTS_FILE
    try:
        header = read_header(path)
    except (HeaderError, RecursionError, OSError) as exc:
        what = "JSON nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        p.bad(f, "header", f"corrupt safetensors header: {what}",
              "re-save the adapter with save_pretrained(safe_serialization=True)")
        return
    # [0-9], not \d: \d and int() take any Unicode digit, so 'layers.١.' would pass as layer 1
    # here while vLLM matches no module by that name.
    layer_re = re.compile(rf"^{re.escape(base.layer_prefix)}\.(0|[1-9][0-9]*)\.(.+)$")
    issues: list[tuple[str, str, str, str]] = []
    seen: dict[str, set[str]] = {}
    for key, info in header.items():
        m = _LORA_KEY.match(key)
        if not m:
            what = "DoRA magnitude" if "lora_magnitude_vector" in key else "not a lora_A/lora_B"
            issues.append(("bad", key, f"{what} weight; vLLM serves only LoRA A/B matrices",
                           "retrain as a plain LoRA without modules_to_save/DoRA/embeddings"))
            continue
        module, ab = m["module"], m["ab"]
        seen.setdefault(module, set()).add(ab)
        if info.dtype not in WEIGHT_DTYPES:
            issues.append(("bad", key, f"dtype {info.dtype} (expected F16, BF16 or F32)",
                           "save the adapter in a float dtype"))
        lm = layer_re.match(module)
        if not lm or lm[2] not in base.modules:
            issues.append(("unfit", key, f"module {module!r} is not a linear layer of base "
                           f"{base.name!r}", "push to the base it was trained on (--base)"))
            continue
        if int(lm[1]) >= base.num_layers:
            issues.append(("unfit", key, f"layer {lm[1]} but base {base.name!r} has "
                           f"{base.num_layers} layers", "push to the base it was trained on"))
            continue
        if len(info.shape) != 2:
            issues.append(("bad", key, f"shape {list(info.shape)} is not 2-D",
                           "re-save the adapter"))
            continue
        in_f, out_f = base.modules[lm[2]]
        rank = _rank_for(module, r, rank_pattern)
        want = (rank, in_f) if ab == "A" else (out_f, rank)
        if rank < 1:  # r itself is invalid (reported above): check only the base's dimension
            want = (info.shape[0], in_f) if ab == "A" else (out_f, info.shape[-1])
        if info.shape != want:
            issues.append(("unfit", key, f"shape {list(info.shape)} but base {base.name!r} "
                           f"with r={rank} needs {list(want)}",
                           "push to the base it was trained on (--base), or fix r in "
                           "adapter_config.json"))
    for module, abs_ in sorted(seen.items()):
        if abs_ != {"A", "B"}:
            missing = ({"A", "B"} - abs_).pop()
            issues.append(("bad", module, f"has no lora_{missing} weight", "re-save the adapter"))
    if not header or not seen:
        issues.append(("bad", "tensors", "no LoRA weights in the file", "re-save the adapter"))
    for kind, key, what, fix in issues[:MAX_LISTED]:
        (p.bad if kind == "bad" else p.unfit)(f, f"tensor {key}", what, fix)
    if len(issues) > MAX_LISTED:
        p.unfit(f, "tensors", f"... and {len(issues) - MAX_LISTED} more tensor problems",
                "see above")


def _read_loraplex(d: Path, base: BaseModelRecord, p: _Problems) -> dict[str, Any]:
    path = d / LORAPLEX_FILE
    if not path.is_file():
        return {}
    meta = _read_json_object(path, LORAPLEX_FILE, p, "fix or remove the file")
    if meta is None:
        return {}
    fp = meta.get("base_fingerprint")
    if fp is not None and not isinstance(fp, str):
        p.bad(LORAPLEX_FILE, "base_fingerprint", f"is {_json_kind(fp)}, must be a string such as "
              "'sha256:...'", "fix or remove the field")
        meta.pop("base_fingerprint")
    elif fp is not None and fp != base.fingerprint:
        p.unfit(LORAPLEX_FILE, "base_fingerprint", f"adapter was trained on base {fp}, but base "
                f"{base.name!r} is {base.fingerprint}",
                "push with --base NAME of the base it was trained on (register it first)")
    if not isinstance(meta.get("chat_template", ""), (str, type(None))):
        p.bad(LORAPLEX_FILE, "chat_template", f"is {_json_kind(meta['chat_template'])}, must be "
              "a string", "fix the file")
        meta.pop("chat_template")
    stops = meta.get("stop_tokens")
    if stops is not None and not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        p.bad(LORAPLEX_FILE, "stop_tokens", "must be a list of strings", "fix the file")
        meta.pop("stop_tokens")
    tf = meta.get("tool_format")
    if tf is not None and tf not in TOOL_FORMATS:
        p.bad(LORAPLEX_FILE, "tool_format", f"is {tf!r}, not one of {', '.join(TOOL_FORMATS)}",
              "fix the file, or push with --tool-format")
        meta.pop("tool_format")
    return meta


def validate_adapter_dir(dir: str | Path, base: BaseModelRecord, max_rank: int,
                         max_bytes: int) -> AdapterSummary:
    """Check a PEFT LoRA directory against `base` and the limits; return what it contains.

    Raises AdapterInvalid / AdapterIncompatible listing every problem found.
    """
    d = Path(dir).expanduser()
    if not d.is_dir():
        raise AdapterInvalid(f"adapter directory {str(d)!r} does not exist or is not a directory")
    p = _Problems()
    sizes = _list_files(d, p)
    total = sum(sizes.values())
    if total > max_bytes:
        p.unfit(str(d), "size", f"{total} bytes exceeds the limit {max_bytes}",
                "remove files that are not needed or raise LORAPLEX_MAX_ADAPTER_BYTES")

    cfg: dict[str, Any] | None = None
    if CONFIG_FILE not in sizes:
        p.bad(CONFIG_FILE, "file", "missing", "push a PEFT adapter directory "
              "(model.save_pretrained(dir) writes adapter_config.json)")
    else:
        cfg = _read_json_object(d / CONFIG_FILE, CONFIG_FILE, p, "re-save the adapter")
    # The declared base first: when it is wrong, that is the problem to read first.
    meta = _read_loraplex(d, base, p)
    declared = (cfg or {}).get("base_model_name_or_path")
    fp = None
    if isinstance(declared, str) and declared:
        # Any string an uploader wrote: '~nosuchuser' (RuntimeError), a NUL or an over-long
        # name (ValueError/OSError) must not become a 500; only a readable base directory counts.
        try:
            where = Path(declared).expanduser()
            if where.is_dir():
                fp = fingerprint_base(where)
        except (ConfigError, OSError, RuntimeError, *_JSON_ERRORS):
            fp = None
        if fp is not None and fp != base.fingerprint:
            p.unfit(CONFIG_FILE, "base_model_name_or_path", f"{declared!r} is a different base "
                    f"({fp}) than {base.name!r} ({base.fingerprint})",
                    "push with --base NAME of the base it was trained on (register it first)")

    r, alpha, targets, rank_pattern = 0, 0.0, set(), {}
    if cfg is not None:
        r, alpha, targets, rank_pattern = _check_config(cfg, base, max_rank, p)

    if WEIGHTS_FILE not in sizes:
        p.bad(WEIGHTS_FILE, "file", "missing", "save with save_pretrained(safe_serialization=True)")
    elif cfg is not None:
        _check_tensors(d / WEIGHTS_FILE, base, r, rank_pattern, p)

    template, source = meta.get("chat_template"), LORAPLEX_FILE
    stops = meta.get("stop_tokens")
    try:
        if template is None:
            template, source = read_chat_template(d)
        if stops is None:
            stops = read_eos_tokens(d) or None
    except ConfigError as exc:
        p.bad("tokenizer files", "json", str(exc), "fix or remove the tokenizer files")
    except (OSError, RecursionError, ValueError, TypeError, AttributeError) as exc:
        # A tokenizer file of the wrong shape (e.g. "model": [] or "added_tokens": {}).
        p.bad("tokenizer files", "json", f"malformed ({type(exc).__name__}: {exc})"[:300],
              "fix or remove the tokenizer files")

    if p.invalid or p.incompatible:
        problems = p.invalid + p.incompatible
        cls = AdapterInvalid if p.invalid else AdapterIncompatible
        raise cls(f"adapter {str(d)!r} cannot be served on base {base.name!r} "
                  f"({len(problems)} problem(s)):", problems=problems)

    return AdapterSummary(
        peft_type=cfg["peft_type"],
        rank=max([r, *rank_pattern.values()]),
        alpha=alpha,
        target_modules=sorted(targets),
        files={rel: sha256_file(d / rel) for rel in sizes},
        sizes=sizes,
        total_size=total,
        chat_template=template,
        chat_template_source=source if template is not None else None,
        stop_tokens=stops,
        tool_format=meta.get("tool_format"),
        declared_base_fingerprint=meta.get("base_fingerprint"),
        base_model_name_or_path=declared if isinstance(declared, str) else None,
    )
