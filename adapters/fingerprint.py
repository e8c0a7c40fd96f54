"""Base model identity: fingerprint, module shape map, chat template and stop tokens.

Everything here reads small files only (config.json, tokenizer files, safetensors headers);
weights are never loaded. The fingerprint is sha256 over the config fields that fix the
architecture and tensor shapes plus the tokenizer bytes, so the same base saved again (even by
another transformers version) keeps its fingerprint, while a different base or tokenizer under the
same name does not.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from loraplex.adapters.errors import ConfigError
from loraplex.adapters.records import BaseModelRecord
from loraplex.adapters.safetensors_header import HeaderError, read_header

FINGERPRINT_VERSION = "loraplex-base-v1"
# Fields that decide shapes and semantics. Others (dtype, transformers_version, use_cache,
# _name_or_path, ...) change when a model is merely re-saved.
CONFIG_FIELDS = (
    "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "max_position_embeddings", "rope_theta", "rope_scaling", "tie_word_embeddings",
    "hidden_act", "num_experts", "num_local_experts", "moe_intermediate_size",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")
_LAYER_WEIGHT = re.compile(r"^(?P<prefix>(?:.*\.)?layers)\.(?P<idx>\d+)\.(?P<suffix>.+)\.weight$")


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object file; ConfigError naming the file on failure."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    # Multimodal configs nest the language model's fields under text_config.
    nested = config.get("text_config")
    return {**config, **nested} if isinstance(nested, dict) else config


def fingerprint_base(dir: str | Path) -> str:
    """`sha256:<hex>` over canonical config fields and the tokenizer files' bytes."""
    d = Path(dir)
    if not (d / "config.json").is_file():
        raise ConfigError(f"{d}: no config.json; pass a Hugging Face model directory")
    config = _text_config(read_json(d / "config.json"))
    canon = {k: config[k] for k in CONFIG_FIELDS if config.get(k) is not None}
    h = hashlib.sha256()
    h.update(FINGERPRINT_VERSION.encode())
    h.update(json.dumps(canon, sort_keys=True, separators=(",", ":")).encode())
    for fname in TOKENIZER_FILES:
        p = d / fname
        if p.is_file():
            h.update(f"\0{fname}\0".encode())
            h.update(p.read_bytes())
            if fname == "tokenizer.json":
                break  # the fast tokenizer file fully defines the tokenizer
    return "sha256:" + h.hexdigest()


def read_chat_template(dir: str | Path) -> tuple[str | None, str | None]:
    """(template, source file) from tokenizer_config.json, chat_template.jinja or .json."""
    d = Path(dir)
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), jinja.name
    for fname in ("tokenizer_config.json", "chat_template.json"):
        p = d / fname
        if not p.is_file():
            continue
        tpl = read_json(p).get("chat_template")
        if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default")
        if isinstance(tpl, str) and tpl.strip():
            return tpl, p.name
    return None, None


def _token_content(tok: Any) -> str | None:
    if isinstance(tok, dict):
        tok = tok.get("content")
    return tok if isinstance(tok, str) and tok else None


def _id_to_token(d: Path) -> dict[int, str]:
    p = d / "tokenizer.json"
    if not p.is_file():
        return {}
    data = read_json(p)
    out: dict[int, str] = {}
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        out.update({i: t for t, i in vocab.items() if isinstance(i, int)})
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        out.update({i: e[0] for i, e in enumerate(vocab) if isinstance(e, list) and e})
    for t in data.get("added_tokens") or []:
        if isinstance(t, dict) and isinstance(t.get("id"), int):
            out[t["id"]] = t.get("content")
    return out


def read_eos_tokens(dir: str | Path) -> list[str]:
    """End-of-turn tokens: tokenizer_config eos_token plus generation_config eos_token_id(s)."""
    d = Path(dir)
    tokens: list[str] = []
    if (d / "tokenizer_config.json").is_file():
        eos = _token_content(read_json(d / "tokenizer_config.json").get("eos_token"))
        if eos:
            tokens.append(eos)
    if (d / "generation_config.json").is_file():
        ids = read_json(d / "generation_config.json").get("eos_token_id")
        ids = ids if isinstance(ids, list) else [ids]
        vocab = _id_to_token(d) if any(isinstance(i, int) for i in ids) else {}
        for i in ids:
            tok = vocab.get(i) if isinstance(i, int) else None
            if tok and tok not in tokens:
                tokens.append(tok)
    return tokens


def _weight_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set((read_json(index).get("weight_map") or {}).values()))
        return [d / n for n in names]
    return sorted(d.glob("*.safetensors"))


def module_shapes(dir: str | Path) -> tuple[str, int, dict[str, tuple[int, int]]]:
    """(layer prefix, num layers, {suffix: (in, out)}) from the weights' safetensors headers.

    Architecture-agnostic: every 2-D `<prefix>.N.<suffix>.weight` is a linear layer whose
    weight is stored [out, in]. If several `...layers` stacks exist (a VLM's vision tower),
    the language model's `model.layers` wins, else the largest stack.
    """
    d = Path(dir)
    files = _weight_files(d)
    if not files:
        raise ConfigError(
            f"{d}: no *.safetensors weights; save the base with "
            "save_pretrained(..., safe_serialization=True)"
        )
    found: dict[str, dict[str, tuple[int, int]]] = {}
    layers: Counter[str] = Counter()
    max_idx: dict[str, int] = {}
    for f in files:
        try:
            header = read_header(f)
        except (HeaderError, OSError) as exc:
            raise ConfigError(f"{f}: unreadable safetensors header ({exc})") from None
        for key, info in header.items():
            m = _LAYER_WEIGHT.match(key)
            if not m or len(info.shape) != 2:
                continue
            prefix = m["prefix"]
            out_f, in_f = info.shape
            found.setdefault(prefix, {}).setdefault(m["suffix"], (in_f, out_f))
            layers[prefix] += 1
            max_idx[prefix] = max(max_idx.get(prefix, -1), int(m["idx"]))
    if not found:
        raise ConfigError(f"{d}: no 2-D '*.layers.N.*.weight' tensors found in the weights")
    prefix = "model.layers" if "model.layers" in found else layers.most_common(1)[0][0]
    return prefix, max_idx[prefix] + 1, dict(sorted(found[prefix].items()))


def inspect_base(name: str, dir: str | Path) -> BaseModelRecord:
    """Build the registry record of a base model directory (headers and small files only)."""
    d = Path(dir).expanduser().resolve()
    if not d.is_dir():
        raise ConfigError(f"base model directory {str(d)!r} does not exist")
    fingerprint = fingerprint_base(d)
    config = _text_config(read_json(d / "config.json"))
    prefix, num_layers, modules = module_shapes(d)
    template, _ = read_chat_template(d)
    archs = config.get("architectures")
    return BaseModelRecord(
        name=name,
        fingerprint=fingerprint,
        architecture=archs[0] if isinstance(archs, list) and archs else config.get("model_type"),
        modules=modules,
        layer_prefix=prefix,
        num_layers=num_layers,
        vocab_size=config.get("vocab_size"),
        hidden_size=config.get("hidden_size"),
        chat_template=template,
        eos_tokens=read_eos_tokens(d),
        source_dir=str(d),
    )
