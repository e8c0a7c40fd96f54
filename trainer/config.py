"""TrainConfig: every option of `loraplex train`, typed once; the YAML file and the CLI mirror it.

    cfg = load_config(yaml_path, cli_overrides)   # file values, then flags on top, then validated

Each field is a flag: `max_seq_len` <-> `--max-seq-len`; booleans get `--x/--no-x`; lists take
several values. A YAML file uses the field names (dashes or underscores). Validation errors
become one ConfigError naming the option and the fix. Nothing here reads environment variables:
the registry's own settings (LORAPLEX_HOME, ...) are read by the registry when --register is used.
"""

from __future__ import annotations

import argparse
import importlib.util
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loraplex.adapters.errors import ConfigError

_EMBEDDINGS = ("embed_tokens", "lm_head", "wte", "wpe", "embed_out", "output", "embeddings")


class TrainConfig(BaseModel):
    """Options of one training run. Field descriptions are the CLI help."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    # -- model and data
    # A Path holds a hub id unchanged ("org/name@rev"); loraplex.adapters.models.resolve_model
    # turns either form into the model directory.
    base: Path = Field(description="base model: a directory (Hugging Face format) or a hub id "
                       "org/name[@revision] from the HF cache (HF_HOME)")
    data: list[str] = Field(min_length=1, description="training data: files or directories "
                            "of shards (*.jsonl, *.json, *.parquet), datasets save_to_disk "
                            "directories, or hf:OWNER/NAME[:CONFIG] (a hub dataset in the local "
                            "HF cache, never downloaded); rows in Alpaca, ShareGPT or OpenAI "
                            "messages form")
    output: Path | None = Field(None, description="adapter directory to write (required unless "
                                "--inspect)")
    overwrite: bool = Field(False, description="replace an existing output directory")
    format: Literal["auto", "alpaca", "sharegpt", "openai"] = Field(
        "auto", description="force the input format instead of detecting it per row")
    eval_data: list[str] = Field(default_factory=list, description="held-out eval data (the "
                                 "same kinds of sources as --data)")
    split: str = Field("train", min_length=1, description="split of a DatasetDict directory or "
                       "hub dataset in --data")
    eval_split: str = Field("test", min_length=1, description="split of a DatasetDict directory "
                            "or hub dataset in --eval-data")
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="held-out fraction of the "
                                 "training data when no --eval-data is given")
    chat_template: str | None = Field(None, description="chatml, llama2, alpaca or a .jinja "
                                      "file; default: the base tokenizer's template")
    tool_format: str | None = Field(None, description="how the adapter writes tool calls (a "
                                    "vLLM --tool-call-parser name, e.g. hermes): recorded in "
                                    "loraplex.json so the server parses its calls")
    max_seq_len: int = Field(1024, ge=8, description="rows longer than this after rendering "
                             "are rejected")
    min_tokens: int = Field(0, ge=0, description="length filter: drop rows shorter than this")
    max_tokens: int | None = Field(None, ge=1, description="length filter: drop rows longer "
                                   "than this (a curation choice, below --max-seq-len)")
    dedup: Literal["none", "exact", "normalized"] = Field(
        "exact", description="drop duplicate conversations (normalized: case, whitespace and "
        "punctuation ignored)")
    strict: bool = Field(False, description="fail if any row is rejected")
    train_on_inputs: bool = Field(False, description="also train on prompt tokens")
    packing: bool = Field(False, description="pack each micro-batch into one row (no padding, "
                          "block-diagonal attention)")
    inspect: int = Field(0, ge=0, description="print N rendered examples token by token with "
                         "labels, then exit")

    # -- LoRA
    lora_r: int = Field(8, description="LoRA rank (>= 1)")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale = alpha / r)")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    target_modules: list[str] = Field(default_factory=lambda: ["all-linear"],
                                      description="modules to adapt; all-linear = every linear "
                                      "layer but the output head")
    use_rslora: bool = Field(False, description="rank-stabilized scale alpha / sqrt(r)")
    use_dora: bool = Field(False, description="DoRA (not servable by vLLM)")
    modules_to_save: list[str] = Field(default_factory=list, description="fully trained "
                                       "modules (embeddings/lm_head are not servable by vLLM)")
    allow_unservable: bool = Field(False, description="allow DoRA / modules_to_save anyway")

    # -- optimization
    epochs: float = Field(3.0, gt=0, description="passes over the training data")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer "
                                  "steps (overrides --epochs)")
    batch_size: int = Field(8, ge=1, description="examples per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(2e-4, gt=0, description="peak learning rate (AdamW)")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay "
                                                                  "after warmup")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="warmup fraction of steps")
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    seed: int = Field(0, description="seed for initialization, shuffling and dropout")

    # -- hardware
    device: Literal["auto", "cuda", "mps", "cpu"] = Field(
        "auto", description="where to train; auto: cuda if available, else mps, else cpu")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="compute precision (torch autocast around forward and loss; the "
        "LoRA weights, optimizer and saved adapter stay fp32; fp16 adds a GradScaler); auto: "
        "bf16 on a CUDA GPU that supports it, else fp32")
    gradient_checkpointing: bool | None = Field(
        None, description="recompute activations in backward to save memory (default: on for "
        "a GPU, off for cpu)")
    quantize: Literal["none", "4bit", "8bit"] = Field(
        "none", description="QLoRA: load the frozen base quantized with bitsandbytes (4bit: "
        "NF4, double quantization, bf16/fp16 compute; 8bit: LLM.int8) and train the LoRA on "
        "it; needs cuda and the bitsandbytes package. The adapter is a normal LoRA, served on "
        "the unquantized base")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="engine when launched by torchrun / accelerate launch: ddp (every "
        "GPU holds the whole base) or fsdp (FSDP2: the base, LoRA and optimizer state sharded "
        "over the GPUs, for a base that does not fit one; also --fsdp, or an accelerate FSDP "
        "config); no effect in a single process")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="attention kernel of the base; flash_attention_2 needs cuda, the "
        "flash-attn package and bf16/fp16")

    # -- evaluation, checkpoints, logging
    eval_steps: int | None = Field(None, ge=1, description="eval loss every N steps (default: "
                                   "once per epoch)")
    early_stopping_patience: int | None = Field(None, ge=1, description="stop after N evals "
                                                "without improvement; the best weights are kept")
    early_stopping_min_delta: float = Field(0.0, ge=0.0)
    save_steps: int | None = Field(None, ge=1, description="checkpoint every N steps")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept")
    run_dir: Path | None = Field(None, description="progress.jsonl and checkpoints while "
                                 "training (default: <output>.run)")
    keep_checkpoints: bool = Field(False, description="keep the run dir after success")
    resume: bool = Field(False, description="continue from the latest checkpoint (optimizer, "
                         "scheduler, RNG and data position restored)")
    log_steps: int = Field(10, ge=1, description="progress log line every N steps")
    progress_bar: bool = Field(True, description="show a progress bar on stderr")
    eval_exact_match: int = Field(200, ge=0, description="greedy exact-match on up to N eval "
                                  "examples, base vs adapter, at the end (0: off)")
    max_new_tokens: int = Field(64, ge=1, description="generation length for exact-match")

    # -- registry
    # `register` is a BaseModel attribute, so the field has another name behind the same flag/key.
    register_name: str | None = Field(None, alias="register", description="push the adapter "
                                      "to the registry as NAME")
    alias: str | None = Field(None, description="alias to point at the new version")
    registry_base: str | None = Field(None, description="registry name of the base (default: "
                                      "the registered base with the same fingerprint, else the "
                                      "base directory's name)")
    description: str = Field("", description="version description for the registry")
    registry_url: str | None = Field(None, description="default: LORAPLEX_REGISTRY_URL")
    artifacts_url: str | None = Field(None, description="default: LORAPLEX_ARTIFACTS_URL")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        from loraplex.adapters.adapter_format import TOOL_FORMATS

        if self.tool_format is not None and self.tool_format not in TOOL_FORMATS:
            raise ValueError(f"tool_format: {self.tool_format!r} is not one of "
                             f"{', '.join(TOOL_FORMATS)}")
        if self.distributed == "fsdp" and self.quantize != "none":
            raise ValueError(f"quantize: --quantize {self.quantize} cannot be combined with "
                             "--fsdp (sharding a bitsandbytes-quantized base is not supported); "
                             "use --quantize none with --fsdp, or QLoRA with DDP")
        if (self.device not in ("auto", "cpu") or self.precision not in ("auto", "fp32")
                or self.attn_implementation == "flash_attention_2" or self.quantize != "none"):
            resolve_runtime(self)  # an explicit choice this machine cannot honour fails here
        if self.lora_r < 1:
            raise ValueError(f"lora_r: rank {self.lora_r} is not allowed; use a rank >= 1 "
                             "(e.g. --lora-r 8)")
        if self.inspect == 0 and self.output is None:
            raise ValueError("output: missing; pass --output DIR (or --inspect N)")
        if self.alias is not None and self.register_name is None:
            raise ValueError("alias: --alias needs --register NAME")
        if self.early_stopping_patience and not (self.eval_data or self.eval_fraction > 0):
            raise ValueError("early_stopping_patience: early stopping needs an eval set "
                             "(--eval-data or --eval-fraction)")
        if not self.allow_unservable:
            if self.use_dora:
                raise ValueError("use_dora: vLLM cannot serve DoRA adapters; drop --use-dora "
                                 "(or pass --allow-unservable)")
            emb = [m for m in self.modules_to_save if m.split(".")[-1] in _EMBEDDINGS]
            if emb:
                raise ValueError(f"modules_to_save: {emb} (embeddings / lm_head) cannot be "
                                 "served by vLLM; drop them (or pass --allow-unservable)")
            if self.modules_to_save:
                raise ValueError(f"modules_to_save: {self.modules_to_save} are fully trained "
                                 "modules vLLM LoRA cannot serve; drop them (or pass "
                                 "--allow-unservable)")
        return self

    @property
    def work_dir(self) -> Path:
        assert self.output is not None
        return self.run_dir or self.output.with_name(self.output.name + ".run")

    def hyperparameters(self) -> dict[str, Any]:
        """What the manifest records: everything that shapes the weights (no paths, no I/O)."""
        skip = {"base", "data", "split", "output", "overwrite", "eval_data", "eval_split",
                "inspect", "run_dir",
                "keep_checkpoints", "resume", "progress_bar", "register_name", "alias",
                "registry_base", "description",
                "registry_url", "artifacts_url", "log_steps",
                "distributed"}  # the trainer records the engine it launched, if any
        hp = self.model_dump(mode="json", exclude=skip)
        hp.update(resolve_runtime(self).as_dict())  # what "auto" became on this machine
        return hp


@dataclass(frozen=True)
class Runtime:
    """The hardware options with "auto" resolved on this machine."""

    device: str  # cuda | mps | cpu
    precision: str  # bf16 | fp16 | fp32
    gradient_checkpointing: bool
    attn_implementation: str
    quantize: str = "none"  # none | 4bit | 8bit

    @property
    def gpu(self) -> bool:
        return self.device != "cpu"

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "precision": self.precision,
                "gradient_checkpointing": self.gradient_checkpointing,
                "attn_implementation": self.attn_implementation}

    def describe(self) -> str:
        return (f"device {self.device}, precision {self.precision}, gradient checkpointing "
                f"{'on' if self.gradient_checkpointing else 'off'}, attention "
                f"{self.attn_implementation}"
                + (f", base quantized {self.quantize} (QLoRA)" if self.quantize != "none" else ""))


def resolve_runtime(cfg: TrainConfig) -> Runtime:
    """Resolve device/precision/gradient checkpointing/attention; ValueError (option: message)
    when an explicit choice cannot run here."""
    import torch

    cuda = torch.cuda.is_available()
    mps_backend = getattr(torch.backends, "mps", None)
    mps = bool(mps_backend is not None and mps_backend.is_available())
    device = cfg.device
    if device == "auto":
        device = "cuda" if cuda else "mps" if mps else "cpu"
    elif device == "cuda" and not cuda:
        raise ValueError("device: --device cuda, but no CUDA GPU is available (torch "
                         f"{torch.__version__}, torch.cuda.is_available() is False); use "
                         "--device auto or --device cpu")
    elif device == "mps" and not mps:
        raise ValueError("device: --device mps, but Apple MPS is not available here; use "
                         "--device auto or --device cpu")
    precision = cfg.precision
    bf16_ok = device != "cuda" or torch.cuda.is_bf16_supported()
    if precision == "auto":
        precision = "bf16" if device == "cuda" and bf16_ok else "fp32"
    elif precision == "bf16" and not bf16_ok:
        raise ValueError("precision: this GPU does not support bf16; use --precision fp16 "
                         "or fp32")
    elif precision == "fp16" and device == "cpu":
        raise ValueError("precision: fp16 needs a GPU (cuda or mps); on cpu use --precision "
                         "bf16 or fp32")
    attn = cfg.attn_implementation
    if attn == "flash_attention_2":
        if device != "cuda":
            raise ValueError(f"attn_implementation: flash_attention_2 needs cuda (device is "
                             f"{device}); use --attn-implementation sdpa")
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("attn_implementation: flash_attention_2 needs the flash-attn "
                             "package (pip install flash-attn); or use sdpa")
        if precision == "fp32":
            raise ValueError("attn_implementation: flash_attention_2 runs in bf16/fp16 only; "
                             "use --precision bf16 or --attn-implementation sdpa")
    if cfg.quantize != "none":
        if device != "cuda":
            raise ValueError(f"quantize: --quantize {cfg.quantize} loads the base with "
                             f"bitsandbytes, which needs a CUDA GPU (device is {device}); use "
                             "--quantize none here")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(f"quantize: --quantize {cfg.quantize} needs the bitsandbytes "
                             "package (pip install bitsandbytes); or use --quantize none")
    gc = cfg.gradient_checkpointing
    return Runtime(device=device, precision=precision,
                   gradient_checkpointing=device != "cpu" if gc is None else gc,
                   attn_implementation=attn, quantize=cfg.quantize)


# -- YAML + CLI ----------------------------------------------------------------------------------

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def option_names() -> dict[str, str]:
    """Flag/YAML key (alias or field name) -> field name."""
    return {(f.alias or n): n for n, f in TrainConfig.model_fields.items()}


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(inner type, optional) of `X | None`."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; unset flags stay absent so file values survive."""
    for name, f in TrainConfig.model_fields.items():
        name = f.alias or name
        tp, _ = _unwrap(f.annotation)
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": name,
                              "help": (f.description or "") + _default_note(f)}
        origin = typing.get_origin(tp)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is list:
            kw.update(nargs="+", metavar="X")
        elif origin is Literal:
            kw["choices"] = list(typing.get_args(tp))
        elif tp in (int, float):
            kw.update(type=tp, metavar="N")
        else:
            kw["metavar"] = name.upper().split("_")[-1]
        parser.add_argument(_flag(name), **kw)


def _default_note(f: Any) -> str:
    if f.is_required():
        return " (required)"
    d = f.get_default(call_default_factory=True)
    return "" if d in (None, False, "", []) else f" (default: {d})"


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path).expanduser()
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {str(p)!r}: {exc}", param="config") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}",
                          param="config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must be a mapping of option: value",
                          param="config")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def load_config(yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                ) -> TrainConfig:
    """File values, then `overrides` (CLI flags) on top; one ConfigError listing every problem."""
    values = read_yaml(yaml_path) if yaml_path else {}
    values.update(overrides or {})
    for key in ("data", "eval_data", "target_modules", "modules_to_save"):
        if isinstance(values.get(key), str):  # `data: file.jsonl` in YAML means one file
            values[key] = [values[key]]
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "missing":
                msg = f"missing; pass {_flag(loc)}"
            elif err["type"] == "extra_forbidden":
                msg = "unknown option (see `loraplex train --help`)"
            problems.append(f"{_flag(loc)}: {msg}" if loc else msg)
        raise ConfigError("invalid training options:\n  " + "\n  ".join(problems)) from None
