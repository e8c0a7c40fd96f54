"""Many processes, one optimizer: torch DistributedDataParallel, as `torchrun` / `accelerate launch`
set it up. No collective here is hand-made: gradients are all-reduced by DDP, and the few scalars
and small objects the loop exchanges go through torch.distributed's own calls.

    dist = init(runtime.device)  # reads the launcher's environment; a plain run gets Dist() (rank 0
                                 # of 1) and nothing below does anything
    net = dist.wrap(model)       # DDP over the PEFT model when launched, the model itself otherwise

A launcher (`torchrun --nproc-per-node N -m loraplex.adapters.cli train ...`, or `accelerate
launch --multi_gpu ...`, which runs torchrun) starts the same command N times and sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_process_group(init_method="env://")`
reads them. Every process holds the whole model and trains on its share of each batch (see
`LoraTrainer._train_step`); rank 0 alone writes files, the others wait for it (`on_main`).

What is not here: FSDP and DeepSpeed. An `accelerate launch` configured for them is refused
(`init`), rather than silently run as DDP with the whole base on every GPU.
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

# accelerate launch marks the engines it was configured for in the environment of each process.
UNSUPPORTED_ENGINES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
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

    def wrap(self, model: Any) -> Any:
        if not self.launched:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def no_sync(self, net: Any, sync: bool) -> Any:
        """DDP all-reduces gradients in every backward; inside no_sync it only accumulates them.
        Gradient accumulation syncs on the last micro-batch of a step only."""
        return net.no_sync() if self.launched and not sync else contextlib.nullcontext()

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


def launch_rank() -> int:
    """This process's global rank as the launcher set it (0 when not launched by one)."""
    return int(os.environ.get("RANK", "0"))


def init(device: str) -> Dist:
    """Join the process group a launcher prepared (WORLD_SIZE in the environment), else Dist().

    One process per device: on cuda, this process's GPU is LOCAL_RANK and the backend NCCL; on
    cpu, gloo. Launched with a single process (WORLD_SIZE=1) the group is still made, so the
    multi-process path is the one that runs.
    """
    if "WORLD_SIZE" not in os.environ:
        return Dist()
    problem = unsupported_launch(device)
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
                backend=str(dist.get_backend()), control=control, owns_group=owns)


def unsupported_launch(device: str) -> str | None:
    """Why this launch cannot run as DDP, or None."""
    engines = [name for var, name in UNSUPPORTED_ENGINES.items()
               if os.environ.get(var, "").lower() in ("1", "true")]
    if engines:
        return (f"accelerate launch is configured for {engines[0]}, which loraplex train does "
                "not support yet; launch DDP instead (accelerate launch --multi_gpu without an "
                "FSDP/DeepSpeed config, or torchrun), where every GPU holds the whole base")
    if device == "mps":
        return ("--device mps cannot train with several processes; launch one process, or use "
                "--device cpu")
    return None


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
