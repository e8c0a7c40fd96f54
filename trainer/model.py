"""The model a run trains: the base from disk with a fresh, seeded PEFT LoRA, on its device.

Precision and memory choices live here (trainer/config.py `resolve_runtime` decides them):
the frozen base in the compute dtype on a GPU, float32 on a CPU, or quantized by bitsandbytes
(QLoRA, --quantize); the LoRA weights always float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraplex.adapters.errors import ConfigError
from loraplex.trainer.config import Runtime, TrainConfig, resolve_runtime


def quantization_config(rt: Runtime) -> Any:
    """QLoRA's base loading (Dettmers et al. 2023): 4bit is NF4 with double quantization and
    the compute in the run's precision; 8bit is LLM.int8(). None for a full-precision base."""
    if rt.quantize == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if rt.quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(rt.precision, torch.float32)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)


def load_model(base: Path, cfg: TrainConfig, place: bool = True) -> Any:
    """The base with a fresh LoRA (seeded) from PEFT, on the resolved device (`place`), or left
    on the CPU for FSDP2 to shard onto the device (a base that does not fit one GPU).

    The base is float32 on cpu and in the compute precision (bf16/fp16) on a GPU, where it is
    frozen and its memory matters; the LoRA weights are float32 everywhere (the optimizer updates
    them in full precision and the adapter is saved in float32; vLLM casts it at load).
    With --quantize the base is loaded by bitsandbytes straight onto this process's GPU (a
    quantized model cannot be moved afterwards) and prepared for k-bit training by PEFT (norms
    in fp32, input grads, checkpointing); the LoRA on top is the same as on a full base.
    """
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    rt = resolve_runtime(cfg)
    torch.manual_seed(cfg.seed)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(rt.precision, torch.float32)
    quant = quantization_config(rt)
    extra: dict[str, Any] = {}
    if quant is not None:  # on this rank's GPU (distributed.init set it from LOCAL_RANK)
        extra = {"quantization_config": quant, "device_map": {"": torch.cuda.current_device()}}
    model = AutoModelForCausalLM.from_pretrained(
        str(base), dtype=dtype if rt.gpu else torch.float32,
        attn_implementation=rt.attn_implementation, **extra)
    # Non-reentrant checkpointing saves and restores the RNG state, so dropout masks are the
    # same in the recomputation; input grads let PEFT's frozen embeddings feed the LoRA layers.
    ckpt = {"use_reentrant": False}
    if quant is not None:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=rt.gradient_checkpointing,
            gradient_checkpointing_kwargs=ckpt)
    elif rt.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
        model.enable_input_require_grads()
    targets = cfg.target_modules
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, bias="none", task_type="CAUSAL_LM",
        modules_to_save=cfg.modules_to_save or None)
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:  # e.g. target modules not found in the base
        raise ConfigError(f"cannot build the LoRA model: {exc}", param="target_modules") from None
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model if quant is not None or not place else model.to(rt.device)
