"""vLLM's /tokenize and /detokenize, per base or adapter (an adapter's chat template renders
`messages`). lm-evaluation-harness and other clients use them to count and align tokens."""

from __future__ import annotations

from fastapi import Request

from loraplex.adapters.errors import BadRequest
from loraplex.server.openai.protocol import DetokenizeRequest, TokenizeRequest
from loraplex.server.openai.serving_chat import ChatServing


class TokenServing(ChatServing):
    async def tokenize(self, req: TokenizeRequest, raw: Request) -> dict:
        version = await self.resolve(req.model, raw)
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

    async def detokenize(self, req: DetokenizeRequest, raw: Request) -> dict:
        await self.resolve(req.model, raw)
        vocab = self.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise BadRequest(f"tokens must be in [0, {vocab})", param="tokens")
        return {"prompt": self.tokenizer.decode(req.tokens)}
