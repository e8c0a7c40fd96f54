"""Evaluation inside a training run: greedy generation through the chat template the adapter
is served with, and exact match against the reference answers of held-out rows.

The same rendering as the server (adapters/chat.py), so what is measured here is the prompt a
client's request becomes; `loraplex eval` measures through the server itself.

Under FSDP2 (`dist.sharded`) every rank generates for its share of the prompts: the model's
layers are all-gathered in each forward, so all ranks run the same number of `generate` calls (a
rank short of prompts repeats one and drops the answer) with `synced_gpus=True` (a rank whose
rows have all stopped keeps stepping until every rank's have); the answers are then gathered.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from loraplex.adapters.chat import ChatTokenizer, render
from loraplex.trainer.dataset import Example

if TYPE_CHECKING:
    from loraplex.trainer.distributed import Dist


def pad_token_id(tokenizer: ChatTokenizer, default: int) -> int:
    name = tokenizer.special_tokens.get("pad_token")
    tid = tokenizer.token_to_id(name) if name else None
    return tid if tid is not None else default


def generate(model: Any, tokenizer: ChatTokenizer, template: str, prompts: list[list[dict[str, str]]],
             max_new_tokens: int = 64, batch_size: int = 32, dist: Dist | None = None,
             ) -> list[str]:
    """Greedy answers through the chat template (the server's rendering) with left padding.
    With a sharded `dist` (FSDP2) every rank must call this, with the same prompts."""
    import torch

    stops = tokenizer.stop_token_ids(template)
    pad = pad_token_id(tokenizer, stops[0] if stops else 0)
    encoded = [render(template, p, tokenizer).token_ids for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    sharded = dist is not None and dist.sharded
    if sharded:
        assert dist is not None
        mine = dist.shard(order)  # strided over the length order: similar widths on every rank
        rounds = math.ceil(len(order[::dist.world]) / batch_size)  # rank 0's share is the largest
        batches = [mine[s:s + batch_size] for s in range(0, rounds * batch_size, batch_size)]
    else:
        batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for batch in batches:
            idx = batch or order[:1]  # an FSDP2 rank out of prompts still joins the forwards
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=stops or None,
                                 pad_token_id=pad, synced_gpus=sharded)
            for row, i in enumerate(batch):
                new = out[row, width:].tolist()
                cut = next((k for k, t in enumerate(new) if t in stops), len(new))
                answers[i] = tokenizer.decode(new[:cut], skip_special_tokens=True)
    model.train(was_training)
    if sharded:
        assert dist is not None
        for part in dist.gather({i: answers[i] for batch in batches for i in batch}):
            for i, a in part.items():
                answers[i] = a
    return answers


def exact_match(model: Any, tokenizer: ChatTokenizer, template: str, examples: list[Example],
                max_new_tokens: int = 64, dist: Dist | None = None,
                batch_size: int = 32) -> dict[str, Any]:
    """Share of examples whose greedy answer equals the last assistant turn (whitespace-trimmed).
    With a sharded `dist` (FSDP2) every rank must call this and gets the same result."""
    prompts = [ex.messages[:-1] for ex in examples]
    refs = [ex.messages[-1]["content"].strip() for ex in examples]
    preds = generate(model, tokenizer, template, prompts, max_new_tokens, batch_size, dist)
    hits = [p.strip() == r for p, r in zip(preds, refs)]
    return {"exact_match": sum(hits) / max(1, len(hits)), "n": len(hits),
            "samples": [{"prompt": p[-1]["content"], "reference": r, "prediction": x}
                        for p, r, x in list(zip(prompts, refs, preds))[:5]]}
