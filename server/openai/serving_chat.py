"""/v1/chat/completions and /v1/render.

A chat request is rendered with the chat template of the adapter version it names (from the
registry record), by the same `loraplex.adapters.chat.render` the trainer builds its labels
with, and sent to the engine as token ids plus that template's stop token ids. vLLM V1 applies
one chat template per server; doing it here is what lets every adapter keep its own.

Tools: `tools` go to the template (as `apply_chat_template(tools=...)`), and the output is
parsed with the tool format of the version the request names (`AdapterVersion.tool_format`,
else the base's `LORAPLEX_TOOL_FORMAT`) by vLLM's own parser for it
(server/engine/tool_parsers.py); `required` and named `tool_choice` are enforced by constrained
decoding, as vLLM's server does. vLLM's server has one parser per server; here each adapter
version writes calls its own way. Tools for a version without a format are a 400, never a
silent text answer.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from loraplex.adapters import chat
from loraplex.adapters.errors import BadRequest, ConfigError
from loraplex.adapters.records import AdapterVersion
from loraplex.server.engine.tool_parsers import ParsedOutput, ToolCallParser, ToolCallStream
from loraplex.server.interface import Chunk, GenRequest, SamplingSpec, TokenLogprob
from loraplex.server.openai.protocol import ChatCompletionRequest, RenderRequest
from loraplex.server.openai.serving import Output, Prepared, ServingBase, finish_reason, usage


def _tools(tools) -> list[dict] | None:
    return [t.model_dump(exclude_none=True) for t in tools] if tools else None


class ToolSession:
    """The tool side of one request: its format's parser and OpenAI's tool arguments."""

    def __init__(self, parser: ToolCallParser, req: ChatCompletionRequest):
        self.parser, self.mode = parser, req.tool_mode()
        self.tools = _tools(req.tools)
        tc = req.tool_choice
        self.choice = tc.model_dump() if hasattr(tc, "model_dump") else tc
        self.parallel = req.parallel_tool_calls

    def apply(self, sampling: SamplingSpec) -> None:
        """Constrain decoding as vLLM's server does for this format and tool_choice."""
        d = self.parser.decoding(self.tools, self.choice, self.parallel)
        if d.json_schema is not None or d.structural_tag is not None:
            # A forced call (required / named) wins over response_format, as in vLLM.
            sampling.json_object, sampling.json_schema = False, d.json_schema
            sampling.structural_tag = d.structural_tag
        # Markers such as <tool_call> may be special tokens: keep them for the parser.
        sampling.skip_special_tokens = sampling.skip_special_tokens and d.skip_special_tokens

    def parse(self, text: str) -> ParsedOutput:
        return self.parser.parse(text, self.tools, self.choice, self.parallel)

    def stream(self) -> ToolCallStream:
        return self.parser.stream(self.tools, self.choice, self.parallel)

    def finish(self, reason: str | None, called: bool) -> str | None:
        # As vLLM's server: "tool_calls" when calls were made under auto or required; a named
        # call ends with "stop" (OpenAI does the same).
        if reason == "stop" and called and self.mode in ("auto", "required"):
            return "tool_calls"
        return finish_reason(reason)


class ChatServing(ServingBase):
    _parsers: dict[str, ToolCallParser] | None = None

    def tool_parser(self, fmt: str) -> ToolCallParser:
        """One parser per tool format, over the base's transformers tokenizer (made once)."""
        if self._parsers is None:
            self._parsers = {}
        if fmt not in self._parsers:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(self.settings.model))
            try:
                self._parsers[fmt] = ToolCallParser(fmt, tok)
            except ConfigError as exc:
                raise BadRequest(f"{exc.message} (the tool format of this model or adapter): "
                                 "register it with a format its tokenizer supports",
                                 param="tools") from None
        return self._parsers[fmt]

    def tools_for(self, version: AdapterVersion | None, req: ChatCompletionRequest
                  ) -> ToolSession | None:
        """The request's tool handling, or None when it sends no tools or tool_choice none."""
        if not req.tools or req.tool_mode() == "none":
            return None
        fmt = (version.tool_format if version else None) or self.settings.tool_format
        if fmt is None:
            what = f"adapter {version.ref}" if version else f"base model {req.model!r}"
            raise BadRequest(
                f"{what} has no tool format, so its tool calls cannot be parsed: register the "
                "adapter with --tool-format (hermes, llama3_json, mistral...), or set "
                "LORAPLEX_TOOL_FORMAT for the base; or send tool_choice none", param="tools")
        return ToolSession(self.tool_parser(fmt), req)
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
        tools = self.tools_for(version, req)
        if req.logprobs:
            sampling.logprobs = req.top_logprobs or 0
        rf = req.response_format
        if rf is not None and rf.type == "json_object":
            sampling.json_object = True
        elif rf is not None and rf.type == "json_schema":
            sampling.json_schema = rf.json_schema.schema_
        if tools is not None:
            tools.apply(sampling)
        gen = GenRequest(f"chatcmpl-{uuid.uuid4().hex}", ids, sampling)
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await self.run(Prepared(
            [gen], version, "chat", req.stream,
            events=lambda chunks: _events(chunks, gen, req.model, created, include_usage, tools),
            body=lambda outs: _body(outs[0], gen, req.model, created, tools)), raw)

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
                  created: int, include_usage: bool, tools: ToolSession | None
                  ) -> AsyncIterator[dict]:
    head = {"id": gen.request_id, "object": "chat.completion.chunk", "created": created,
            "model": model}
    n = gen.sampling.n
    # OpenAI sends the role first, alone.
    yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                "logprobs": None, "finish_reason": None} for i in range(n)]}
    streams = [tools.stream() for _ in range(n)] if tools else None
    called = [False] * n
    prompt, completion = len(gen.prompt_token_ids), 0
    async for _, chunk in chunks:
        prompt = chunk.prompt_tokens
        choices = []
        for d in chunk.deltas:
            completion += len(d.token_ids)
            if not d.text and not d.finish_reason and not d.token_ids:
                continue
            delta: dict = {"content": d.text}
            if streams is not None:
                sd = streams[d.index].feed(d.text, d.token_ids, finished=bool(d.finish_reason))
                delta = {}
                if sd is not None and sd.content:
                    delta["content"] = sd.content
                if sd is not None and sd.tool_calls:
                    called[d.index] = True
                    delta["tool_calls"] = [_call_delta(c) for c in sd.tool_calls]
                if not delta and not d.finish_reason:
                    continue  # the parser holds text back that may start a call
            reason = (tools.finish(d.finish_reason, called[d.index]) if tools
                      else finish_reason(d.finish_reason))
            choices.append({"index": d.index, "delta": delta,
                            "logprobs": chat_logprobs(d.logprobs), "finish_reason": reason})
        if choices:
            yield {**head, "choices": choices, **({"usage": None} if include_usage else {})}
    if include_usage:
        yield {**head, "choices": [], "usage": usage(prompt, completion)}


def _call_delta(c) -> dict:
    """OpenAI's streamed tool call: id, type and name once, then argument fragments."""
    out: dict = {"index": c.index}
    if c.id:
        out["id"], out["type"] = c.id, "function"
    fn: dict = {}
    if c.name:
        fn["name"] = c.name
    fn["arguments"] = c.arguments or ""
    out["function"] = fn
    return out


def _body(out: Output, gen: GenRequest, model: str, created: int, tools: ToolSession | None) -> dict:
    choices = []
    for i in range(len(out.texts)):
        message: dict = {"role": "assistant", "content": out.texts[i]}
        reason = finish_reason(out.finish[i])
        if tools is not None:
            parsed = tools.parse(out.texts[i])
            message["content"] = parsed.content
            if parsed.tool_calls:
                message["tool_calls"] = [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.name, "arguments": c.arguments}}
                    for c in parsed.tool_calls]
            reason = tools.finish(out.finish[i], bool(parsed.tool_calls))
        choices.append({"index": i, "message": message,
                        "logprobs": chat_logprobs(out.logprobs[i]), "finish_reason": reason})
    return {"id": gen.request_id, "object": "chat.completion", "created": created,
            "model": model, "choices": choices,
            "usage": usage(out.prompt_tokens, out.completion_tokens)}


def chat_logprobs(lps: list[TokenLogprob] | None):
    if lps is None:
        return None
    entry = lambda t, lp: {"token": t, "logprob": lp, "bytes": list(t.encode())}  # noqa: E731
    return {"content": [{**entry(x.token, x.logprob),
                         "top_logprobs": [entry(t, lp) for t, lp in x.top]} for x in lps]}
