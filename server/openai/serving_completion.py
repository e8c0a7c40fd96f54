"""/v1/completions: text in, text out, for one prompt or a batch, with what evaluation
harnesses need (lm-evaluation-harness `local-completions`).

- `prompt`: a string, a list of token ids, or a batch of either; the batch runs concurrently in
  the engine and answers one choice per prompt and `n` (index = prompt index x n + choice).
- `echo: true`: each choice's text starts with its prompt; with `logprobs`, the prompt's tokens
  come first in `logprobs` too, scored by the model (the first token, which has no context,
  gets a null logprob), as vLLM's server does.
- `max_tokens: 0` with `echo`: score the prompt only (log-likelihood tasks); the engine is asked
  for one token, which is not returned.
- `logprobs: k` (0-5): per token, its logprob and a `top_logprobs` map of the chosen token and
  the k most likely ones (OpenAI's legacy shape, as vLLM returns it).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from loraplex.adapters.errors import BadRequest
from loraplex.server.interface import Chunk, GenRequest, TokenLogprob
from loraplex.server.openai.protocol import CompletionRequest
from loraplex.server.openai.serving import Output, Prepared, ServingBase, finish_reason, usage

MAX_PROMPTS = 256  # prompts in one request: each is an engine request of its own


class CompletionServing(ServingBase):
    async def completion(self, req: CompletionRequest, raw: Request):
        prompts = self._prompts(req.prompt)
        version = await self.resolve(req.model, raw, req.user)
        score_only = req.max_tokens == 0
        rid = f"cmpl-{uuid.uuid4().hex}"
        gens = []
        for k, ids in enumerate(prompts):
            max_new = 1 if score_only else req.max_tokens
            param = "prompt" if len(prompts) == 1 else f"prompt[{k}]"
            sampling = self.sampling(req, self.budget(len(ids), max_new, param))
            sampling.logprobs = req.logprobs
            if req.echo and req.logprobs is not None:
                sampling.prompt_logprobs = req.logprobs
            gens.append(GenRequest(rid if len(prompts) == 1 else f"{rid}-{k}", ids, sampling))
        texts = [p if isinstance(p, str) else None for p in _as_list(req.prompt)]
        echo = [self._echo(g.prompt_token_ids, t) for g, t in zip(gens, texts)] if req.echo else None
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        shape = _Shape(rid, req.model, created, req.n, echo, req.logprobs, score_only)
        return await self.run(Prepared(
            gens, version, "completions", req.stream,
            events=lambda chunks: shape.events(chunks, gens, include_usage),
            body=shape.body), raw)

    def _prompts(self, prompt) -> list[list[int]]:
        """A prompt as text, token ids, or a list of either -> token id lists (checked)."""
        out = [self.tokenizer.encode_prompt(p) if isinstance(p, str) else list(p)
               for p in _as_list(prompt)]
        if not out or any(not p for p in out):
            raise BadRequest("prompt is empty", param="prompt")
        if len(out) > MAX_PROMPTS:
            raise BadRequest(f"{len(out)} prompts in one request, the limit is {MAX_PROMPTS}: "
                             "split the batch", param="prompt")
        vocab = self.tokenizer.vocab_size
        for p in out:
            if any(not 0 <= t < vocab for t in p):
                raise BadRequest(f"prompt token ids must be in [0, {vocab})", param="prompt")
        return out

    def _echo(self, ids: list[int], text: str | None) -> tuple[str, list[str]]:
        """(the prompt's text, the text of each prompt token) for echo."""
        if text is None:
            text = self.tokenizer.decode(ids)
        return text, [self.tokenizer.decode([t]) for t in ids]


def _as_list(prompt) -> list:
    if isinstance(prompt, str) or (prompt and all(isinstance(p, int) for p in prompt)):
        return [prompt]
    return list(prompt)


class _Shape:
    """How engine outputs become OpenAI completion choices (streamed or not)."""

    def __init__(self, rid: str, model: str, created: int, n: int,
                 echo: list[tuple[str, list[str]]] | None, logprobs: int | None,
                 score_only: bool):
        self.rid, self.model, self.created, self.n = rid, model, created, n
        self.echo, self.logprobs, self.score_only = echo, logprobs, score_only

    def _prompt_part(self, k: int, plps: list[TokenLogprob | None] | None):
        """(text, logprob entries) the choices of prompt k start with under echo."""
        if self.echo is None:
            return "", []
        text, token_texts = self.echo[k]
        if self.logprobs is None:
            return text, []
        plps = plps or [None] * len(token_texts)
        return text, [lp if lp is not None else TokenLogprob(tt, None, [])
                      for lp, tt in zip(plps, token_texts)]

    def body(self, outs: list[Output]) -> dict:
        choices = []
        prompt_tokens = completion_tokens = 0
        for k, out in enumerate(outs):
            prefix, prefix_lps = self._prompt_part(k, out.prompt_logprobs)
            for i in range(len(out.texts)):
                text = "" if self.score_only else out.texts[i]
                lps = [] if self.score_only else (out.logprobs[i] or [])
                choices.append({
                    "index": k * self.n + i, "text": prefix + text,
                    "logprobs": (text_logprobs(prefix_lps + lps)
                                 if self.logprobs is not None else None),
                    "finish_reason": "length" if self.score_only else finish_reason(out.finish[i])})
                completion_tokens += 0 if self.score_only else len(out.token_ids[i])
            prompt_tokens += out.prompt_tokens
        return {"id": self.rid, "object": "text_completion", "created": self.created,
                "model": self.model, "choices": choices,
                "usage": usage(prompt_tokens, completion_tokens)}

    async def events(self, chunks: AsyncIterator[tuple[int, Chunk]], gens: list[GenRequest],
                     include_usage: bool) -> AsyncIterator[dict]:
        head = {"id": self.rid, "object": "text_completion", "created": self.created,
                "model": self.model}
        echoed: set[tuple[int, int]] = set()
        offsets: dict[tuple[int, int], int] = {}  # text_offset carried across chunks
        prompt = {k: len(g.prompt_token_ids) for k, g in enumerate(gens)}
        completion = 0
        async for k, chunk in chunks:
            prompt[k] = chunk.prompt_tokens
            choices = []
            for d in chunk.deltas:
                completion += len(d.token_ids)
                text, lps = d.text, d.logprobs or []
                if (k, d.index) not in echoed:  # the prompt goes first, once per choice
                    echoed.add((k, d.index))
                    prefix, prefix_lps = self._prompt_part(k, chunk.prompt_logprobs)
                    text, lps = prefix + text, prefix_lps + lps
                if not text and not d.finish_reason and not d.token_ids:
                    continue
                key = (k, d.index)
                logprobs = None
                if self.logprobs is not None:
                    logprobs = text_logprobs(lps, offsets.get(key, 0))
                    offsets[key] = offsets.get(key, 0) + sum(len(x.token) for x in lps)
                choices.append({"index": k * self.n + d.index, "text": text,
                                "logprobs": logprobs,
                                "finish_reason": finish_reason(d.finish_reason)})
            if choices:
                yield {**head, "choices": choices, **({"usage": None} if include_usage else {})}
        if include_usage:
            yield {**head, "choices": [], "usage": usage(sum(prompt.values()), completion)}


def text_logprobs(lps: list[TokenLogprob], start: int = 0) -> dict:
    """OpenAI's legacy logprobs: tokens, token_logprobs, top_logprobs (the chosen token and
    the top k, as vLLM's server returns them) and text_offset."""
    offsets, pos = [], start
    for x in lps:
        offsets.append(pos)
        pos += len(x.token)
    return {"tokens": [x.token for x in lps], "token_logprobs": [x.logprob for x in lps],
            "top_logprobs": [None if x.logprob is None else {x.token: x.logprob, **dict(x.top)}
                             for x in lps],
            "text_offset": offsets}
