"""The adapter directory a run produces, written atomically, and its registration.

    <output>/
      adapter_config.json, adapter_model.safetensors   PEFT LoRA (what vLLM loads)
      chat_template.jinja                               the exact template it was trained with
      loraplex.json                                     manifest: base fingerprint, template, stop
                                                        tokens, data hash + counts, hyperparameters,
                                                        metrics (the registry reads it)
      report.json, loss.png, progress.jsonl             metrics, loss curves, the progress log
      rejected.jsonl, train_config.yaml                 every dropped row; the effective options

Everything is written into a hidden sibling directory and renamed into place at the end, so a
failure at any point leaves no partial adapter under the output name. Before the rename,
`verify_adapter` reads the adapter back (every trained tensor present, non-empty and equal to what
was trained; PEFT loads it; the registry's validation passes): an empty or partial adapter is the
usual silent failure of a multi-process run, and here it is an error instead. `preflight` checks
the output and the registry options before any training, so a wrong path fails in seconds.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraplex.adapters.adapter_format import LORAPLEX_FILE as MANIFEST
from loraplex.adapters.adapter_format import MANIFEST_VERSION, LoraplexManifest
from loraplex.adapters.chat import template_label
from loraplex.adapters.errors import ConfigError

if TYPE_CHECKING:
    from loraplex.adapters.records import PushResult
    from loraplex.trainer.config import TrainConfig
    from loraplex.trainer.dataset import DataReport
    from loraplex.trainer.train import LoopState



def _check_writable(d: Path, what: str) -> None:
    """Probe the nearest existing ancestor of `d` (creating nothing that stays behind)."""
    probe = d
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(probe))
        Path(tempfile.mkdtemp(dir=probe, prefix=".loraplex-probe-")).rmdir()
    except OSError as exc:
        raise ConfigError(f"{what} {str(d)!r} is not writable ({exc.strerror or exc}); choose a "
                          f"writable location", param=what.split()[0]) from None


def preflight(cfg: TrainConfig) -> None:
    """Fail before training on an unusable output, run dir or registry option."""
    assert cfg.output is not None
    out = cfg.output.expanduser()
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ConfigError(f"output {str(out)!r} exists and is not a directory; choose "
                              "another --output", param="output")
        if any(out.iterdir()) and not cfg.overwrite:
            raise ConfigError(f"output directory {str(out)!r} already exists and is not empty; "
                              "pass --overwrite or choose another --output", param="output")
    _check_writable(out.parent, "output directory")
    _check_writable(cfg.work_dir, "run directory")
    if cfg.register_name:
        from loraplex.adapters.refs import check_alias, check_name

        check_name(cfg.register_name)
        if cfg.alias:
            check_alias(cfg.alias)
        if cfg.registry_base:
            check_name(cfg.registry_base, "base name")
        with _open_registry(cfg):
            pass  # opens (and migrates) the database now rather than after an hour of training


@contextlib.contextmanager
def staging(out: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh hidden sibling of `out`; renamed onto `out` on success, deleted on any failure."""
    tmp = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = None
        if out.exists():
            if not overwrite and any(out.iterdir()):
                raise ConfigError(f"output directory {str(out)!r} appeared during training; "
                                  "pass --overwrite or choose another --output", param="output")
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def plot_losses(state: LoopState, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: render straight to the PNG
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if state.train_loss:
        steps, losses = zip(*state.train_loss)
        ax.plot(steps, losses, color="tab:blue", alpha=0.35, lw=1, label="train (per step)")
        k = max(1, len(losses) // 25)  # a moving average shows the trend under the noise
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, color="tab:blue", lw=2, label=f"train (mean of {k})")
    if state.eval_loss:
        steps, losses = zip(*state.eval_loss)
        ax.plot(steps, losses, "o-", color="tab:orange", lw=2, label="eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per labelled token)")
    ax.set_title("loraplex train: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("loraplex", "torch", "transformers", "peft"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def write_adapter(cfg: TrainConfig, model: Any, *, base: Path, template: str, stops: list[str],
                  data: DataReport, metrics: dict[str, Any], state: LoopState,
                  run_dir: Path, hyperparameters: dict[str, Any] | None = None,
                  log: Callable[[str], None] | None = None,
                  weights: dict[str, Any] | None = None) -> Path:
    """Write the adapter directory (see module doc) atomically, verified; returns its path.

    `hyperparameters` (default: the config's) is what the manifest records: the trainer adds the
    number of processes and the effective batch. `weights`: the trained parameters, whole (by
    parameter name), when the model holds shards of them (FSDP2); they are what is saved and
    what the saved file is verified against."""
    import yaml

    from loraplex.adapters.fingerprint import fingerprint_base

    assert cfg.output is not None
    out = cfg.output.expanduser().resolve()
    manifest = {
        "loraplex_manifest": MANIFEST_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_fingerprint": fingerprint_base(base),
        "base_model": str(base),
        "chat_template": template,
        "chat_template_name": cfg.chat_template or f"base ({template_label(template)})",
        "stop_tokens": stops,
        "tool_format": cfg.tool_format,
        "data": {k: v for k, v in data.to_dict().items()},
        "hyperparameters": hyperparameters or cfg.hyperparameters(),
        "metrics": {k: v for k, v in metrics.items() if k != "exact_match"}
        | ({"exact_match": {k: v for k, v in metrics["exact_match"].items() if k != "samples"}}
           if "exact_match" in metrics else {}),
        "versions": _versions(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with staging(out, cfg.overwrite) as tmp:
        # PEFT picks the adapter's tensors out of `state_dict` (None: the model's own).
        model.save_pretrained(str(tmp), safe_serialization=True, state_dict=weights)
        (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
        (tmp / MANIFEST).write_text(
            LoraplexManifest(**manifest).model_dump_json(indent=2, exclude_none=True) + "\n")
        servable = not (cfg.use_dora or cfg.modules_to_save)  # --allow-unservable
        verified = verify_adapter(tmp, model, base, servable=servable, shown_as=str(out),
                                  weights=weights)
        if log is not None:
            log(f"verified the adapter: {verified['tensors']} LoRA tensors of "
                f"{verified['modules']} modules equal to the trained weights, loaded back by "
                "PEFT" + (", passes the registry's validation" if servable else ""))
        report = {"metrics": metrics, "data": data.to_dict(), "verified": verified,
                  "history": {"train_loss": state.train_loss, "eval_loss": state.eval_loss}}
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        plot_losses(state, tmp / "loss.png")
        progress = run_dir / "progress.jsonl"
        if progress.is_file():
            shutil.copyfile(progress, tmp / "progress.jsonl")
        with open(tmp / "rejected.jsonl", "w") as f:
            for r in data.rejected:
                f.write(json.dumps({"source": r.source, "code": r.code, "detail": r.detail}) + "\n")
        effective = cfg.model_dump(mode="json", by_alias=True, exclude={"inspect", "resume"})
        (tmp / "train_config.yaml").write_text(yaml.safe_dump(effective, sort_keys=False))
    return out


# -- verification --------------------------------------------------------------------------------

VERIFY_ADAPTER = "loraplex_verify"  # the name PEFT loads the written adapter under, then drops
MAX_PROBLEMS = 20


def _saved_name(param: str, adapter: str) -> str:
    """A PEFT parameter's key in adapter_model.safetensors: its name without the adapter name."""
    return param.replace(f".{adapter}", "")


def verify_adapter(d: Path, model: Any, base: Path, *, servable: bool = True,
                   shown_as: str | None = None,
                   weights: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read the adapter just written to `d` back, against the PEFT `model` that wrote it.

    `weights` (parameter name -> whole tensor) are the trained values when the model holds only
    shards of them (FSDP2); PEFT then loads `d` onto a hollow copy of the base (its structure,
    no weight memory) instead of the sharded model.

    Every trained LoRA tensor must be in the weights file, non-empty, finite, of the trained shape
    and equal to the trained values, and not every lora_B zero (an adapter that changes nothing);
    PEFT must load the directory onto the same model (its own path: config, module matching, key
    names) with those values; and, for a `servable` adapter, the registry's validation must pass
    against the base, exactly as at --register. Raises AdapterInvalid listing every problem.
    """
    import torch
    from safetensors.torch import load_file

    from loraplex.adapters.errors import AdapterInvalid
    from loraplex.adapters.fingerprint import inspect_base
    from loraplex.adapters.validate import WEIGHTS_FILE, validate_adapter_dir

    name = shown_as or str(d)
    if weights is None:
        weights = {n: p for n, p in model.named_parameters() if p.requires_grad}
    trained = {_saved_name(n, model.active_adapter): p.detach().float().cpu()
               for n, p in weights.items() if ".lora_" in n}
    try:
        saved = {k: v for k, v in load_file(str(d / WEIGHTS_FILE)).items() if ".lora_" in k}
    except Exception as exc:  # noqa: BLE001 - missing, truncated, not safetensors: all one answer
        raise AdapterInvalid(f"the adapter written to {name} failed verification: {WEIGHTS_FILE} "
                             f"cannot be read back ({type(exc).__name__}: {exc})") from None
    problems: list[str] = []  # whole-adapter findings first, then each tensor's
    if not trained:
        problems.append("the model has no trained LoRA weights")
    lora_b = [v for k, v in saved.items() if ".lora_B." in k]
    if lora_b and not any(bool(v.any()) for v in lora_b):
        problems.append("every lora_B weight is zero: the adapter changes nothing (no update "
                        "reached the saved weights)")
    problems += [f"{k}: trained, but missing from {WEIGHTS_FILE}"
                 for k in sorted(trained.keys() - saved.keys())]
    problems += [f"{k}: in {WEIGHTS_FILE}, but no such weight was trained"
                 for k in sorted(saved.keys() - trained.keys())]
    for k in sorted(trained.keys() & saved.keys()):
        want, got = trained[k], saved[k]
        if got.numel() == 0:
            problems.append(f"{k}: empty tensor (shape {list(got.shape)}, trained "
                            f"{list(want.shape)})")
        elif got.shape != want.shape:
            problems.append(f"{k}: shape {list(got.shape)}, trained {list(want.shape)}")
        elif not bool(torch.isfinite(got).all()):
            problems.append(f"{k}: holds NaN or infinite values")
        elif not torch.equal(got.float(), want):
            problems.append(f"{k}: differs from the trained weight (max abs difference "
                            f"{float((got.float() - want).abs().max()):.3g})")
    problems += (_peft_load_problems(d, model, trained) if weights is None or not _sharded(model)
                 else _peft_hollow_load_problems(d, model, trained))
    summary = None
    if servable:
        try:  # the limits are the registry's business at push time; here: structure and shapes
            summary = validate_adapter_dir(d, inspect_base(base.name, base), 1 << 30, 1 << 62)
        except AdapterInvalid as exc:
            problems += [f"registry validation: {p}" for p in exc.problems or [exc.message]]
    if problems:
        more = len(problems) - MAX_PROBLEMS
        raise AdapterInvalid(f"the adapter written to {name} failed verification, so it was not "
                             f"kept ({len(problems)} problem(s)):",
                             problems=problems[:MAX_PROBLEMS] + ([f"... and {more} more"]
                                                                 if more > 0 else []))
    return {"tensors": len(saved), "modules": len({k.split(".lora_")[0] for k in saved}),
            "rank": summary.rank if summary else None, "peft_load": True,
            "registry_validation": servable}


def _peft_load_problems(d: Path, model: Any, trained: dict[str, Any]) -> list[str]:
    """Load `d` into the same PEFT model as a second adapter, compare it with the trained one,
    then delete it again (no second copy of the base is loaded)."""
    import torch

    was_training = model.training
    try:
        model.load_adapter(str(d), adapter_name=VERIFY_ADAPTER, is_trainable=False)
        loaded = {_saved_name(n, VERIFY_ADAPTER): p.detach().float().cpu()
                  for n, p in model.named_parameters() if f".{VERIFY_ADAPTER}." in n}
    except Exception as exc:  # noqa: BLE001 - whatever PEFT raises is the finding
        return [f"PEFT cannot load it: {type(exc).__name__}: {str(exc)[:300]}"]
    finally:
        if VERIFY_ADAPTER in model.peft_config:
            model.delete_adapter(VERIFY_ADAPTER)
        model.train(was_training)
    wrong = [k for k, v in trained.items() if k not in loaded or not torch.equal(loaded[k], v)]
    if not wrong:
        return []
    return [f"PEFT loads {len(wrong)} of {len(trained)} LoRA weights with values other than the "
            f"trained ones (first: {wrong[0]})"]


def _sharded(model: Any) -> bool:
    """FSDP2 has sharded `model` (its parameters are DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _peft_hollow_load_problems(d: Path, model: Any, trained: dict[str, Any]) -> list[str]:
    """As `_peft_load_problems`, for a sharded model (whose modules PEFT cannot load into on one
    rank): PEFT loads `d` onto a copy of the base built from its config on the meta device, each
    weight then a zero-stride CPU view of one element (the right device, dtype and shape for PEFT
    to attach the LoRA layers to, and no memory for the base)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            hollow = AutoModelForCausalLM.from_config(model.get_base_model().config)
        for module in hollow.modules():
            for n, p in list(module.named_parameters(recurse=False)):
                setattr(module, n, torch.nn.Parameter(
                    torch.empty((), dtype=p.dtype).expand(p.shape), requires_grad=False))
        loaded_model = PeftModel.from_pretrained(hollow, str(d), adapter_name=VERIFY_ADAPTER)
        loaded = {_saved_name(n, VERIFY_ADAPTER): p.detach().float().cpu()
                  for n, p in loaded_model.named_parameters() if f".{VERIFY_ADAPTER}." in n}
    except Exception as exc:  # noqa: BLE001 - whatever PEFT raises is the finding
        return [f"PEFT cannot load it: {type(exc).__name__}: {str(exc)[:300]}"]
    wrong = [k for k, v in trained.items() if k not in loaded or not torch.equal(loaded[k], v)]
    if not wrong:
        return []
    return [f"PEFT loads {len(wrong)} of {len(trained)} LoRA weights with values other than the "
            f"trained ones (first: {wrong[0]})"]


# -- registry ------------------------------------------------------------------------------------

def _open_registry(cfg: TrainConfig) -> Any:
    from loraplex.adapters.registry import Registry
    from loraplex.adapters.settings import RegistrySettings

    overrides = {k: v for k, v in (("registry_url", cfg.registry_url),
                                   ("artifacts_url", cfg.artifacts_url)) if v}
    return Registry.open(RegistrySettings(**overrides))


def _slug(name: str) -> str:
    s = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")
    return (s or "base")[:64]


def _base_name(cfg: TrainConfig, base: Path) -> str:
    """A new base's registry name: the directory's name, or a hub id's model name (its snapshot
    directory is named by a commit hash)."""
    from loraplex.adapters.models import parse_hub_id

    given = str(cfg.base)
    hub = None if Path(given).expanduser().is_dir() else parse_hub_id(given)
    return _slug(hub[0].split("/")[-1] if hub else base.name)


def register(cfg: TrainConfig, adapter_dir: Path, base: Path) -> PushResult:
    """Push the adapter as the next version of cfg.register (registering its base if needed)."""
    from loraplex.adapters.fingerprint import fingerprint_base

    manifest = json.loads((adapter_dir / MANIFEST).read_text())
    with _open_registry(cfg) as reg:
        fp = fingerprint_base(base)
        name = cfg.registry_base
        if name is None:
            name = next((b.name for b in reg.list_bases() if b.fingerprint == fp), None)
        if name is None or cfg.registry_base is not None:
            name = reg.register_base(name or _base_name(cfg, base), base).name
        training = {"hyperparameters": manifest["hyperparameters"],
                    "data": {k: manifest["data"][k] for k in
                             ("data_sha256", "train", "eval", "dropped", "files")},
                    "chat_template_name": manifest["chat_template_name"]}
        return reg.push(adapter_dir, cfg.register_name, alias=cfg.alias, base=name,
                        description=cfg.description, training=training,
                        metrics=manifest["metrics"])
