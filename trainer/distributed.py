"""Many processes, one optimizer, through torch's own engines, as `torchrun` / `accelerate launch`
set them up: DistributedDataParallel (the default) or FSDP2 (`fully_shard`, `--fsdp`). No collective
here is hand-made: gradients are all-reduced by DDP or reduce-scattered by FSDP2, sharded weights
are gathered by torch.distributed.checkpoint's state-dict API, and the few scalars and small
objects the loop exchanges go through torch.distributed's own calls.

    dist = init(runtime.device, cfg.distributed)  # reads the launcher's environment; a plain run
                                                   # gets Dist() (rank 0 of 1): nothing below acts
    net = dist.wrap(model)  # DDP over the PEFT model; under FSDP2 the model itself, sharded in
                            # place (each decoder layer, then the root); the model itself if alone

A launcher (`torchrun --nproc-per-node N -m loraplex.adapters.cli train ...`, or `accelerate
launch --multi_gpu ...`, which runs torchrun) starts the same command N times and sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_process_group(init_method="env://")`
reads them. Every process trains on its share of each batch (see `LoraTrainer._train_step`);
rank 0 alone writes files, the others wait for it (`on_main`).

DDP: every process holds the whole model. FSDP2 (`--fsdp`, or an `accelerate launch` configured
for FSDP: ACCELERATE_USE_FSDP=true): each process holds 1/N of every parameter (base and LoRA) and
of the optimizer state, and all-gathers one decoder layer at a time for forward and backward, so a
base that does not fit one GPU trains on several. Whatever touches the weights is then collective,
on every rank: the full LoRA weights for the adapter, checkpoints and best-weights snapshots
(`full_state`, `optimizer_state`, in the same format as DDP's), eval loss and generation (every
rank runs the same number of forwards).

What is not here: DeepSpeed and Megatron-LM (refused at `init`, naming --fsdp), and FSDP with a
quantized base (QLoRA) or accelerate's parameter offload (refused too).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from loraplex.adapters.errors import ConfigError, LoraplexError

T = TypeVar("T")

# accelerate launch marks the engine it was configured for in the environment of each process.
ACCELERATE_FSDP = "ACCELERATE_USE_FSDP"  # selects FSDP2 here, as --fsdp does
UNSUPPORTED_ENGINES = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
                       "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}
# Ranks > 0 wait while rank 0 alone works: a checkpoint, then at the end the exact-match eval, the
# adapter and its registration (an upload). NCCL's default 10-minute timeout would fire on a long
# eval, so the waits use a separate CPU (gloo) group with a timeout sized for them. A rank that
# dies is caught sooner than that: the launcher stops the other processes when one fails.
WAIT_TIMEOUT = timedelta(hours=4)


class FollowerExit(SystemExit):
    """A rank other than 0 stops because rank 0 failed; rank 0 reports the error (once)."""


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    backend: str | None = None  # None: not launched, a single process
    control: Any = None  # the gloo group for waits and small objects
    owns_group: bool = False  # init_process_group was ours, so close() destroys it
    engine: str = "ddp"  # ddp | fsdp (what wrap() uses when launched)

    @property
    def sharded(self) -> bool:
        """FSDP2: every rank holds a shard of the model; whatever touches it is collective."""
        return self.launched and self.engine == "fsdp"

    @property
    def launched(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, rows: list[T]) -> list[T]:
        """This rank's rows of a global batch: every world-th one. Strided, not contiguous, because
        batches are sorted by length, so each rank gets a similar mix of long and short rows."""
        return rows[self.rank::self.world]

    def wrap(self, model: Any, device: str = "cpu") -> Any:
        """DDP over `model`, or (FSDP2) `model` itself sharded in place onto `device`; `model`
        unchanged when not launched."""
        if not self.launched:
            return model
        if self.sharded:
            return shard_model(model, device, self.world)
        from torch.nn.parallel import DistributedDataParallel

        dev = next(model.parameters()).device
        return DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)

    def no_sync(self, net: Any, sync: bool) -> Any:
        """DDP all-reduces gradients in every backward; inside no_sync it only accumulates them.
        FSDP2's equivalent is set_requires_gradient_sync(False): no reduce-scatter, the unsharded
        gradients accumulate. Gradient accumulation syncs on the last micro-batch of a step only."""
        if self.sharded:
            net.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return net.no_sync() if self.launched and not sync else contextlib.nullcontext()

    # -- the trainable weights, whole, whatever the engine (collective under FSDP2). FSDP2 keeps
    # the root's parameters unsharded after a forward without backward (an eval): reshard() puts
    # every parameter back to its sharded DTensor before the state-dict API reads or writes it.
    def full_state(self, model: Any) -> dict[str, Any]:
        """The trainable parameters by name, whole, detached copies on the CPU, on every rank.
        Under FSDP2 torch.distributed.checkpoint gathers them (every rank must call this)."""
        names = trainable_names(model)
        if not self.sharded:
            params = dict(model.named_parameters())
            return {n: params[n].detach().cpu().clone() for n in names}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        model.reshard()
        full = get_model_state_dict(model, options=StateDictOptions(
            full_state_dict=True, ignore_frozen_params=True))
        # A tied, frozen weight (lm_head = embed_tokens) can come along: keep the trained ones.
        return {n: full[n].detach().cpu().clone() for n in names}

    def load_full_state(self, model: Any, weights: dict[str, Any]) -> None:
        """Set the trainable parameters from whole tensors (as `full_state` gives them); under
        FSDP2 each rank keeps its shard (every rank must call this, with the same weights)."""
        import torch

        if not self.sharded:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for n in trainable_names(model):
                    params[n].copy_(weights[n])
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        model.reshard()
        # set_model_state_dict replaces the values of the dict it is given: pass a copy.
        set_model_state_dict(model, {n: weights[n] for n in trainable_names(model)},
                             options=StateDictOptions(full_state_dict=True, strict=False))

    def optimizer_state(self, model: Any, opt: Any) -> dict[str, Any]:
        """The optimizer's state_dict() as one process has it (parameters numbered in order);
        under FSDP2 gathered whole onto rank 0 (the others get {}; every rank must call this)."""
        if not self.sharded:
            return opt.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        model.reshard()
        full = get_optimizer_state_dict(model, opt, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        if not full:
            return {}
        ids = {n: i for i, n in enumerate(trainable_names(model))}
        return {"state": {ids[n]: s for n, s in full["state"].items()},
                "param_groups": [{**g, "params": [ids[n] for n in g["params"]]}
                                 for g in full["param_groups"]]}

    def load_optimizer_state(self, model: Any, opt: Any, state: dict[str, Any]) -> None:
        """Inverse of `optimizer_state` (every rank reads the whole state and keeps its shard)."""
        if not self.sharded:
            opt.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        model.reshard()
        names = trainable_names(model)
        by_name = {"state": {names[int(i)]: s for i, s in state["state"].items()},
                   "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                                    for g in state["param_groups"]]}
        set_optimizer_state_dict(model, opt, by_name,
                                 options=StateDictOptions(full_state_dict=True))

    def sum(self, values: list[float], device: Any) -> list[float]:
        """Element-wise sum over ranks of a few numbers (one all_reduce); the values as given when
        not launched."""
        if not self.launched:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=device)  # exact for counts < 2**53
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj` (small, picklable), on every rank, in rank order."""
        if not self.launched:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        if not self.launched:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def check(self, problem: str | None) -> None:
        """Every rank raises the same ConfigError if any rank has a problem, so a condition that
        fails on some nodes only cannot leave the others waiting in a collective."""
        found = [(r, p) for r, p in enumerate(self.gather(problem)) if p is not None]
        if found:
            raise ConfigError("; ".join(f"rank {r}: {p}" if self.world > 1 else p
                                        for r, p in found))

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 alone; the other ranks wait for it (a barrier) and return its result.
        If it fails, rank 0 raises the error and the others exit with the same status, quietly."""
        if not self.launched:
            return fn()
        error: BaseException | None = None
        outcome: tuple[str, Any] | None = None
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after telling the others
                error = exc
                outcome = ("failed", 2 if isinstance(exc, LoraplexError) else 1)
        outcome = self.broadcast(outcome)
        if error is not None:
            raise error
        assert outcome is not None
        if outcome[0] == "failed":
            raise FollowerExit(outcome[1])
        return outcome[1]

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def trainable_names(model: Any) -> list[str]:
    """Names of the trained parameters, in the order the optimizer holds them."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def shard_model(model: Any, device: str, world: int) -> Any:
    """FSDP2 over the PEFT model, in place: `fully_shard` on each decoder layer (the classes the
    model names in `_no_split_modules`), then on the root (embeddings, norm, head). Parameters
    still on the CPU move to this rank's device as they are sharded, so a rank never holds more
    than one layer group whole on the GPU. `generate` goes through the root's hooks too (it does
    not call the root's forward)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh("cuda" if device == "cuda" else "cpu", (world,))
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    classes = set(getattr(inner, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in classes and m is not model]
    if not layers:
        raise ConfigError(f"--fsdp: cannot find the decoder layers of {type(inner).__name__} to "
                          "shard (its _no_split_modules names none); train it with DDP instead",
                          param="distributed")
    for layer in reversed(layers):  # innermost first, should the classes nest
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    register_fsdp_forward_method(model, "generate")
    return model


def launch_rank() -> int:
    """This process's global rank as the launcher set it (0 when not launched by one)."""
    return int(os.environ.get("RANK", "0"))


def _env_true(var: str) -> bool:
    return os.environ.get(var, "").lower() in ("1", "true")


def engine_for(requested: str) -> str:
    """ddp or fsdp: --distributed, or FSDP when accelerate launch was configured for it."""
    return "fsdp" if requested == "fsdp" or _env_true(ACCELERATE_FSDP) else "ddp"


def init(device: str, engine: str = "ddp", quantize: str = "none") -> Dist:
    """Join the process group a launcher prepared (WORLD_SIZE in the environment), else Dist().

    One process per device: on cuda, this process's GPU is LOCAL_RANK and the backend NCCL; on
    cpu, gloo. Launched with a single process (WORLD_SIZE=1) the group is still made, so the
    multi-process path is the one that runs. `engine` is --distributed (ddp, fsdp); an accelerate
    FSDP launch makes it fsdp.
    """
    engine = engine_for(engine)
    if "WORLD_SIZE" not in os.environ:
        return Dist(engine=engine)
    problem = unsupported_launch(device, engine, quantize)
    if problem is not None:
        if launch_rank():
            raise FollowerExit(2)  # every rank finds it; rank 0 says it
        raise ConfigError(problem, param="device")
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "gloo"
    if device == "cuda":
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:
            raise ConfigError(f"LOCAL_RANK {local_rank}, but this node has {gpus} visible GPU(s): "
                              "start at most one process per GPU (--nproc-per-node)",
                              param="device")
        torch.cuda.set_device(local_rank)  # before NCCL starts, and so that "cuda" means this GPU
        backend = "nccl"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend, init_method="env://")
    control = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    if dist.get_rank():
        from transformers.utils import logging

        logging.disable_progress_bar()  # rank 0 shows the loading bars and warnings once
        logging.set_verbosity_error()
    return Dist(rank=dist.get_rank(), local_rank=local_rank, world=dist.get_world_size(),
                backend=str(dist.get_backend()), control=control, owns_group=owns, engine=engine)


def unsupported_launch(device: str, engine: str = "ddp", quantize: str = "none") -> str | None:
    """Why this launch cannot run (as DDP, or FSDP2 for engine fsdp), or None."""
    engines = [name for var, name in UNSUPPORTED_ENGINES.items() if _env_true(var)]
    if engines:
        return (f"accelerate launch is configured for {engines[0]}, which loraplex train does "
                "not support (and is not installed with it); for a base that does not fit one "
                "GPU use FSDP2: `torchrun ... loraplex train --fsdp`, or an accelerate config "
                "with distributed_type: FSDP; for one that fits, DDP: accelerate launch "
                "--multi_gpu without a DeepSpeed config, or torchrun")
    if engine == "fsdp" and quantize != "none":
        return (f"--quantize {quantize} cannot be combined with FSDP (--fsdp or an accelerate "
                "FSDP config): sharding a bitsandbytes-quantized base is not supported; use "
                "--quantize none with FSDP, or QLoRA with DDP (every GPU holds the quantized base)")
    if engine == "fsdp" and _env_true("FSDP_OFFLOAD_PARAMS"):
        return ("accelerate's fsdp_offload_params (CPU offload) is not supported by loraplex "
                "train's FSDP2; set fsdp_offload_params: false (or use more GPUs)")
    if device == "mps":
        return ("--device mps cannot train with several processes; launch one process, or use "
                "--device cpu")
    return None


def accelerate_fsdp_note() -> str | None:
    """An accelerate FSDP config selects FSDP2 here; its other fsdp_config options are not read."""
    if not _env_true(ACCELERATE_FSDP):
        return None
    version = os.environ.get("FSDP_VERSION", "1")
    return ("note: accelerate is configured for FSDP" + (f" (fsdp_version {version})"
                                                          if version != "2" else "")
            + ": loraplex train uses FSDP2 (fully_shard on each decoder layer, then the root); "
            "the other fsdp_config options are not applied (--gradient-checkpointing and "
            "--precision decide)")


def accelerate_precision_note(precision: str) -> str | None:
    """accelerate's --mixed_precision reaches us only as an environment variable we do not apply:
    say so when it asks for something other than what --precision resolved to."""
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if asked is None:  # not launched by accelerate
        return None
    mine = {"fp32": "no"}.get(precision, precision)
    if asked != mine:
        return (f"note: accelerate's mixed_precision={asked} is not applied; --precision decides "
                f"(now {precision})")
    return None
