"""The toy base model: a tiny Llama, its own BPE tokenizer and a ChatML template, built offline.

Nothing can be downloaded from a model hub here, so the demo and every test use this model.
It is built deterministically from a seed and the bundled corpus (data/corpus.txt):

1. train a byte-level BPE tokenizer on the corpus with `tokenizers`;
2. make a Llama config small enough for seconds-long loads (head_dim 64: vLLM's CPU attention
   rejects head_dim 16);
3. pre-train it briefly on the corpus so its next-token predictions are confident. Random
   weights give near-tied logits whose greedy choice flips with batch composition, which would
   make every "batched output == single output" test flaky, and LoRA tuning needs a base that
   already knows words, casing and the chat turn structure.

The result is a normal Hugging Face model directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with the chat template, generation_config.json) that
both transformers and vLLM load.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<pad>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class ToySpec:
    """Everything that determines the toy model's bytes (besides the corpus and this code)."""

    seed: int = 0
    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 4  # head_dim = 64
    num_kv_heads: int = 2
    max_position_embeddings: int = 1024
    seq_len: int = 128
    batch_size: int = 16
    pretrain_steps: int = 200
    lr: float = 3e-3


def corpus_text() -> str:
    return resources.files("loraplex.trainer").joinpath("data/corpus.txt").read_text()


def chatml_template() -> str:
    return resources.files("loraplex.adapters").joinpath("templates/chatml.jinja").read_text()


def spec_digest(spec: ToySpec) -> str:
    """A key for caching built models: changes when the spec, the corpus or this file change."""
    h = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode())
    h.update(corpus_text().encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def train_tokenizer(text: str, vocab_size: int):
    """Byte-level BPE (like GPT-2/Llama-3): every string is encodable, no unknown token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return tok


def _batches(ids, spec: ToySpec, generator):
    """Random windows of the concatenated corpus: cheap, and every step sees fresh text."""
    import torch

    n = ids.numel() - spec.seq_len - 1
    while True:
        starts = torch.randint(0, n, (spec.batch_size,), generator=generator)
        window = torch.stack([ids[s : s + spec.seq_len + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


def build_toy_model(
    out_dir: str | Path, spec: ToySpec = ToySpec(), log: Callable[[str], None] = print
) -> Path:
    """Build, pre-train and save the toy model into `out_dir`. Returns the directory."""
    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    text = corpus_text()

    raw_tok = train_tokenizer(text, spec.vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw_tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",  # the end-of-turn token: generation stops there
        pad_token="<pad>",
        model_max_length=spec.max_position_embeddings,
    )
    tokenizer.chat_template = chatml_template()
    log(f"tokenizer: {len(tokenizer)} tokens ({time.time() - t0:.1f}s)")

    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)

    # Documents are separated by <|endoftext|> so the model learns where text ends.
    sep = tokenizer.bos_token_id
    ids: list[int] = []
    for doc in text.split("\n\n"):
        ids.extend(raw_tok.encode(doc).ids)
        ids.append(sep)
    data = torch.tensor(ids, dtype=torch.long)
    log(f"corpus: {data.numel()} tokens; pre-training {spec.pretrain_steps} steps")

    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, spec.pretrain_steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return spec.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, spec.pretrain_steps - warmup)
        return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(spec.seed)
    batches = _batches(data, spec, gen)
    model.train()
    loss_value = float("nan")
    for step in range(spec.pretrain_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x, y = next(batches)
        loss = _shifted_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = loss.item()
        if step % 50 == 0 or step == spec.pretrain_steps - 1:
            log(f"  step {step:4d}  loss {loss_value:.3f}  ({time.time() - t0:.0f}s)")

    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.bos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(out)
    (out / "loraplex_toy.json").write_text(
        json.dumps({"spec": asdict(spec), "digest": spec_digest(spec), "final_loss": loss_value}, indent=2)
    )
    log(f"toy model written to {out} in {time.time() - t0:.0f}s (final loss {loss_value:.3f})")
    return out


def _shifted_loss(model, x, y):
    """Next-token loss on pre-shifted targets (transformers' `labels=` would shift again)."""
    import torch.nn.functional as F

    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
