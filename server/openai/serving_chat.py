"""/v1/chat/completions and /v1/render.

A chat request is rendered with the chat template of the adapter version it names (from the
registry record), by the same `loraplex.adapters.chat.render` the trainer builds its labels
with, and sent to the engine as token ids plus that template's stop token ids. vLLM V1 applies
one chat template per server; doing it here is what lets every adapter keep its own.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from loraplex.adapters import chat
from loraplex.adapters.errors import BadRequest
from loraplex.adapters.records import AdapterVersion
from loraplex.server.interface import Chunk, GenRequest, TokenLogprob
from loraplex.server.openai.protocol import ChatCompletionRequest, RenderRequest
from loraplex.server.openai.serving import Output, Prepared, ServingBase, finish_reason, usage


def _tools(tools) -> list[dict] | None:
    return [t.model_dump(exclude_none=True) for t in tools] if tools else None


class ChatServing(ServingBase):
    def render_messages(self, v: AdapterVersion | None, messages, *, tools=None, kwargs=None,
                        add_generation_prompt: bool = True):
        template, stops, stop_ids = self.template(v)
        try:
            rendered = chat.render(template, messages, self.tokenizer,
                                   add_generation_prompt=add_generation_prompt,
                                   tools=_tools(tools), kwargs=kwargs)
        except BadRequest as exc:
            exc.param = exc.param or "messages"
            raise
        return rendered, stops, stop_ids

    async def chat(self, req: ChatCompletionRequest, raw: Request):
        version = await self.resolve(req.model, raw, req.user)
        rendered, _, stop_ids = self.render_messages(
            version, req.messages, tools=req.tools, kwargs=req.chat_template_kwargs)
        ids = rendered.token_ids
        sampling = self.sampling(req, self.budget(len(ids), req.max_new_tokens()))
        if not req.ignore_eos:
            sampling.stop_token_ids = list(dict.fromkeys(sampling.stop_token_ids + stop_ids))
        if req.logprobs:
            sampling.logprobs = req.top_logprobs or 0
        rf = req.response_format
        if rf is not None and rf.type == "json_object":
            sampling.json_object = True
        elif rf is not None and rf.type == "json_schema":
            sampling.json_schema = rf.json_schema.schema_
        gen = GenRequest(f"chatcmpl-{uuid.uuid4().hex}", ids, sampling)
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await self.run(Prepared(
            [gen], version, "chat", req.stream,
            events=lambda chunks: _events(chunks, gen, req.model, created, include_usage),
            body=lambda outs: _body(outs[0], gen, req.model, created)), raw)

    async def render(self, req: RenderRequest, raw: Request) -> dict:
        """The prompt and token ids a chat request would be sent to the engine with."""
        version = await self.resolve(req.model, raw)
        rendered, stops, stop_ids = self.render_messages(
            version, req.messages, tools=req.tools, kwargs=req.chat_template_kwargs,
            add_generation_prompt=req.add_generation_prompt)
        return {
            "model": req.model,
            "adapter": version.ref if version else None,
            "chat_template_sha256": version.chat_template_sha256 if version else None,
            "prompt": rendered.text,
            "token_ids": rendered.token_ids,
            "stop_tokens": stops,
            "stop_token_ids": stop_ids,
        }


async def _events(chunks: AsyncIterator[tuple[int, Chunk]], gen: GenRequest, model: str,
                  created: int, include_usage: bool) -> AsyncIterator[dict]:
    head = {"id": gen.request_id, "object": "chat.completion.chunk", "created": created,
            "model": model}
    # OpenAI sends the role first, alone.
    yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                "logprobs": None, "finish_reason": None}
                               for i in range(gen.sampling.n)]}
    prompt, completion = len(gen.prompt_token_ids), 0
    async for _, chunk in chunks:
        prompt = chunk.prompt_tokens
        choices = []
        for d in chunk.deltas:
            completion += len(d.token_ids)
            if not d.text and not d.finish_reason and not d.token_ids:
                continue
            choices.append({"index": d.index, "delta": {"content": d.text},
                            "logprobs": chat_logprobs(d.logprobs),
                            "finish_reason": finish_reason(d.finish_reason)})
        if choices:
            yield {**head, "choices": choices, **({"usage": None} if include_usage else {})}
    if include_usage:
        yield {**head, "choices": [], "usage": usage(prompt, completion)}


def _body(out: Output, gen: GenRequest, model: str, created: int) -> dict:
    choices = [{"index": i, "message": {"role": "assistant", "content": out.texts[i]},
                "logprobs": chat_logprobs(out.logprobs[i]),
                "finish_reason": finish_reason(out.finish[i])} for i in range(len(out.texts))]
    return {"id": gen.request_id, "object": "chat.completion", "created": created,
            "model": model, "choices": choices,
            "usage": usage(out.prompt_tokens, out.completion_tokens)}


def chat_logprobs(lps: list[TokenLogprob] | None):
    if lps is None:
        return None
    entry = lambda t, lp: {"token": t, "logprob": lp, "bytes": list(t.encode())}  # noqa: E731
    return {"content": [{**entry(x.token, x.logprob),
                         "top_logprobs": [entry(t, lp) for t, lp in x.top]} for x in lps]}
