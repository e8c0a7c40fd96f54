"""Evaluation inside a training run: greedy generation through the chat template the adapter
is served with, and exact match against the reference answers of held-out rows.

The same rendering as the server (adapters/chat.py), so what is measured here is the prompt a
client's request becomes; `loraplex eval` measures through the server itself.
"""

from __future__ import annotations

from typing import Any

from loraplex.adapters.chat import ChatTokenizer, render
from loraplex.trainer.dataset import Example


def pad_token_id(tokenizer: ChatTokenizer, default: int) -> int:
    name = tokenizer.special_tokens.get("pad_token")
    tid = tokenizer.token_to_id(name) if name else None
    return tid if tid is not None else default


def generate(model: Any, tokenizer: ChatTokenizer, template: str, prompts: list[list[dict[str, str]]],
             max_new_tokens: int = 64, batch_size: int = 32) -> list[str]:
    """Greedy answers through the chat template (the server's rendering) with left padding."""
    import torch

    stops = tokenizer.stop_token_ids(template)
    pad = pad_token_id(tokenizer, stops[0] if stops else 0)
    encoded = [render(template, p, tokenizer).token_ids for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=stops or None,
                                 pad_token_id=pad)
            for row, i in enumerate(idx):
                new = out[row, width:].tolist()
                cut = next((k for k, t in enumerate(new) if t in stops), len(new))
                answers[i] = tokenizer.decode(new[:cut], skip_special_tokens=True)
    model.train(was_training)
    return answers


def exact_match(model: Any, tokenizer: ChatTokenizer, template: str, examples: list[Example],
                max_new_tokens: int = 64) -> dict[str, Any]:
    """Share of examples whose greedy answer equals the last assistant turn (whitespace-trimmed)."""
    prompts = [ex.messages[:-1] for ex in examples]
    refs = [ex.messages[-1]["content"].strip() for ex in examples]
    preds = generate(model, tokenizer, template, prompts, max_new_tokens)
    hits = [p.strip() == r for p, r in zip(preds, refs)]
    return {"exact_match": sum(hits) / max(1, len(hits)), "n": len(hits),
            "samples": [{"prompt": p[-1]["content"], "reference": r, "prediction": x}
                        for p, r, x in list(zip(prompts, refs, preds))[:5]]}
