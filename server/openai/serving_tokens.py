"""vLLM's /tokenize and /detokenize, per base or adapter (an adapter's chat template renders
`messages`). lm-evaluation-harness and other clients use them to count and align tokens."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import Request

from loraplex.adapters.errors import BadRequest
from loraplex.server.openai.protocol import DetokenizeRequest, TokenizeRequest
from loraplex.server.openai.serving_chat import ChatServing


class TokenServing(ChatServing):
    async def tokenize(self, req: TokenizeRequest, raw: Request) -> dict:
        version = await self.resolve(req.model, raw) if req.model else None
        if req.messages is not None:
            rendered, _, _ = self.render_messages(
                version, req.messages, tools=req.tools, kwargs=req.chat_template_kwargs,
                add_generation_prompt=req.add_generation_prompt)
            ids = rendered.token_ids
        elif req.add_special_tokens:
            ids = self.tokenizer.encode_prompt(req.prompt)
        else:
            ids = self.tokenizer.encode(req.prompt)
        strs = None
        if req.return_token_strs:
            strs = [self.tokenizer.tokenizer.id_to_token(i) for i in ids]
        return {"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids,
                "token_strs": strs}

    async def tokenizer_info(self, model: str | None, raw: Request) -> dict:
        """vLLM's /tokenizer_info: the tokenizer's config (tokenizer_config.json without file
        paths and the added-token table), its class and special tokens, and the chat template
        of `model` (an adapter's own, or the base's). lm-evaluation-harness reads it to use
        the server's tokenizer instead of loading one."""
        version = await self.resolve(model, raw) if model else None
        cfg = {}
        path = Path(str(self.settings.model)) / "tokenizer_config.json"
        if path.is_file():
            cfg = json.loads(path.read_text(encoding="utf-8"))
        for key in ("added_tokens_decoder", "vocab_file", "merges_file", "tokenizer_file",
                    "auto_map"):
            cfg.pop(key, None)
        cfg.update({k: v for k, v in self.tokenizer.special_tokens.items() if isinstance(v, str)})
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        cfg["chat_template"] = self.template(version)[0]
        cfg["model_max_length"] = self.engine.max_model_len
        return cfg

    async def detokenize(self, req: DetokenizeRequest, raw: Request) -> dict:
        if req.model:
            await self.resolve(req.model, raw)  # a 404 for a name this key cannot see
        vocab = self.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise BadRequest(f"tokens must be in [0, {vocab})", param="tokens")
        return {"prompt": self.tokenizer.decode(req.tokens)}
