"""POST /v1/responses: OpenAI's Responses API, stateless, over the chat path.

The input becomes chat messages (protocol_responses.py), rendered with the adapter version's
own chat template like a chat request, and generated through the shared request life
(ServingBase.run). What differs is the answer: a Response object whose `output` is a list of
items (an assistant `message` with `output_text`, then any `function_call`s), and a stream of
typed, numbered events that build it (response.created ... response.completed).

One `_Builder` makes both: the stream feeds it deltas and sends the events it returns; the
JSON body feeds it the whole output and keeps only the final object, so the two cannot
disagree. Framing is OpenAI's: `event: <type>` + `data: {json}`, no `[DONE]` (NAMED_EVENTS).
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from loraplex.adapters.errors import BadRequest, LoraplexError
from loraplex.adapters.records import AdapterVersion
from loraplex.server.engine.tool_parsers import StreamDelta
from loraplex.server.interface import Chunk, GenRequest, SamplingSpec
from loraplex.server.openai.protocol_responses import ResponsesRequest, input_param
from loraplex.server.openai.serving import NAMED_EVENTS, Output, Prepared
from loraplex.server.openai.serving_chat import ChatServing, ToolSession, chat_logprobs


class ResponsesServing(ChatServing):
    async def create(self, req: ResponsesRequest, raw: Request):
        version = await self.resolve(req.model, raw, req.user or req.safety_identifier)
        messages, where = req.chat_messages()
        try:
            rendered, _, stop_ids = self.render_messages(version, messages,
                                                         tools=req.chat_tools())
        except BadRequest as exc:  # name the request's own field, not chat's `messages`
            exc.param = input_param(exc.param, where)
            raise
        ids = rendered.token_ids
        sampling = self.sampling(req, self.budget(len(ids), req.max_output_tokens,
                                                  "max_output_tokens"))
        if not req.ignore_eos:
            sampling.stop_token_ids = list(dict.fromkeys(sampling.stop_token_ids + stop_ids))
        sampling.logprobs = req.logprobs()
        fmt = req.text.format if req.text else None
        if fmt is not None and fmt.type == "json_object":
            sampling.json_object = True
        elif fmt is not None and fmt.type == "json_schema":
            sampling.json_schema = fmt.schema_
        tools = self.tool_session(req, version, sampling)
        gen = GenRequest(f"resp_{uuid.uuid4().hex}", ids, sampling)
        created = int(time.time())
        return await self.run(Prepared(
            [gen], version, "responses", req.stream,
            events=lambda chunks: _events(chunks, _Builder(req, gen.request_id, created), tools),
            body=lambda outs: _body(outs[0], _Builder(req, gen.request_id, created), tools),
            framing=NAMED_EVENTS), raw)

    def tool_session(self, req: ResponsesRequest, version: AdapterVersion | None,
                     sampling: SamplingSpec) -> ToolSession | None:
        """Chat's tool handling for this request (None: no tools, or tool_choice none), with
        `sampling` constrained as chat does; its parsed calls become function_call items."""
        tools = self.tools_for(version, req.as_chat())
        if tools is not None:
            tools.apply(sampling)
        return tools


async def _events(chunks: AsyncIterator[tuple[int, Chunk]], b: _Builder,
                  tools: ToolSession | None) -> AsyncIterator[dict]:
    for e in b.start():
        yield e
    parser = tools.stream() if tools else None
    reason, prompt, produced = None, 0, 0
    try:
        async for _, chunk in chunks:
            prompt = chunk.prompt_tokens
            for d in chunk.deltas:
                produced += len(d.token_ids)
                reason = d.finish_reason or reason
                if parser is None:
                    evs = b.text(d.text, _logprobs(d.logprobs))
                else:
                    evs = b.parsed(parser.feed(d.text, d.token_ids,
                                               finished=d.finish_reason is not None))
                for e in evs:
                    yield e
        if parser is not None and reason is None:  # ended without a last delta: flush
            for e in b.parsed(parser.feed("", (), finished=True)):
                yield e
        for e in b.finish(reason, prompt, produced):
            yield e
    except Exception as exc:  # after the 200 header: in-band, then re-raised for the status
        for e in b.fail(exc):
            yield e
        raise


def _body(out: Output, b: _Builder, tools: ToolSession | None) -> dict:
    if tools is None:
        b.text(out.texts[0], _logprobs(out.logprobs[0]))
    else:
        parsed = tools.parse(out.texts[0])
        b.text(parsed.content or "")
        for i, call in enumerate(parsed.tool_calls):
            b.tool_call(i, call.id, call.name, call.arguments)
    b.finish(out.finish[0], out.prompt_tokens, out.completion_tokens)
    return b.response()


def _logprobs(lps) -> list[dict]:
    return chat_logprobs(lps)["content"] if lps else []


def _hex() -> str:
    return uuid.uuid4().hex


class _Builder:
    """One Response under construction: its output items, and the numbered events that
    announce each change. Text goes into an assistant message item, opened at the first
    non-blank text (blank text before a tool call is no answer); a tool call closes it and
    opens a function_call item. Methods return the events of the change (a body ignores them)."""

    def __init__(self, req: ResponsesRequest, response_id: str, created: int):
        self.req, self.id, self.created = req, response_id, created
        self.seq = 0
        self.output: list[dict] = []
        self.msg: dict | None = None  # the open message item
        self.call: dict | None = None  # the open function_call item
        self.call_index: int | None = None  # the parser's index of the open call
        self.held, self.held_lps = "", []  # leading blank text, not yet sent
        self.status, self.error, self.incomplete, self.usage = "in_progress", None, None, None
        self.completed_at: int | None = None

    def _ev(self, type_: str, **fields) -> dict:
        self.seq += 1
        return {"type": type_, "sequence_number": self.seq - 1, **fields}

    def _at(self, item: dict) -> dict:
        return {"item_id": item["id"], "output_index": self.output.index(item)}

    def response(self) -> dict:
        r, fmt = self.req, self.req.text.format if self.req.text else None
        tc = r.tool_choice
        return {
            "id": self.id, "object": "response", "created_at": self.created,
            "status": self.status, "error": self.error,
            "incomplete_details": self.incomplete, "instructions": r.instructions,
            "max_output_tokens": r.max_output_tokens, "model": r.model,
            "output": copy.deepcopy(self.output),
            "parallel_tool_calls": r.parallel_tool_calls, "previous_response_id": None,
            "reasoning": r.reasoning or {"effort": None, "summary": None},
            "store": False,
            "temperature": 1.0 if r.temperature is None else r.temperature,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True)
                     if fmt else {"type": "text"}},
            "tool_choice": tc.model_dump() if hasattr(tc, "model_dump") else tc or "auto",
            "tools": [t.model_dump() for t in r.tools or []],
            "top_p": 1.0 if r.top_p is None else r.top_p,
            "top_logprobs": r.top_logprobs or 0, "truncation": "disabled",
            "usage": self.usage, "user": r.user, "metadata": r.metadata or {},
            "background": False, "completed_at": self.completed_at,
        }

    def start(self) -> list[dict]:
        return [self._ev("response.created", response=self.response()),
                self._ev("response.in_progress", response=self.response())]

    # -- text ------------------------------------------------------------------------------
    def text(self, delta: str, logprobs: list[dict] | None = None) -> list[dict]:
        if not delta:
            return []
        evs: list[dict] = []
        if self.msg is None:
            self.held += delta
            self.held_lps += logprobs or []
            if not self.held.strip():
                return []
            delta, logprobs, self.held, self.held_lps = self.held, self.held_lps, "", []
            evs += self._close_call() + self._open_message()
        part = self.msg["content"][0]
        part["text"] += delta
        part["logprobs"] += logprobs or []
        evs.append(self._ev("response.output_text.delta", **self._at(self.msg), content_index=0,
                            delta=delta, logprobs=logprobs or []))
        return evs

    def _open_message(self) -> list[dict]:
        self.msg = {"id": f"msg_{_hex()}", "type": "message", "status": "in_progress",
                    "role": "assistant", "content": []}
        self.output.append(self.msg)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        evs = [self._ev("response.output_item.added", output_index=len(self.output) - 1,
                        item=copy.deepcopy(self.msg))]
        self.msg["content"].append(part)
        return evs + [self._ev("response.content_part.added", **self._at(self.msg),
                               content_index=0, part=copy.deepcopy(part))]

    def _close_message(self, status: str = "completed") -> list[dict]:
        if self.msg is None:
            return []
        msg, part = self.msg, self.msg["content"][0]
        msg["status"], self.msg = status, None
        at = self._at(msg)
        return [self._ev("response.output_text.done", **at, content_index=0, text=part["text"],
                         logprobs=part["logprobs"]),
                self._ev("response.content_part.done", **at, content_index=0,
                         part=copy.deepcopy(part)),
                self._ev("response.output_item.done", output_index=at["output_index"],
                         item=copy.deepcopy(msg))]

    # -- tool calls: the parser's (pieces of) calls become function_call items -------------
    def parsed(self, delta: StreamDelta | None) -> list[dict]:
        if delta is None:
            return []
        evs = self.text(delta.content or "")
        for tc in delta.tool_calls:
            evs += self.tool_call(tc.index, tc.id, tc.name, tc.arguments)
        return evs

    def tool_call(self, index: int, call_id: str | None, name: str | None,
                  arguments: str) -> list[dict]:
        """A parsed call, or a piece of one: its first piece (a new `index`) opens the item
        with its id and name; every piece's `arguments` add to its JSON text."""
        evs: list[dict] = []
        if self.call is None or index != self.call_index:
            evs += self._close_message() + self._close_call()
            self.held, self.held_lps = "", []  # blank text before a call is no answer
            self.call = {"id": f"fc_{_hex()}", "type": "function_call", "status": "in_progress",
                         "call_id": call_id or f"call_{_hex()}", "name": name or "",
                         "arguments": ""}
            self.call_index = index
            self.output.append(self.call)
            evs.append(self._ev("response.output_item.added", output_index=len(self.output) - 1,
                                item=copy.deepcopy(self.call)))
        elif name and not self.call["name"]:
            self.call["name"] = name
        if arguments:
            self.call["arguments"] += arguments
            evs.append(self._ev("response.function_call_arguments.delta", **self._at(self.call),
                                delta=arguments))
        return evs

    def _close_call(self, status: str = "completed") -> list[dict]:
        if self.call is None:
            return []
        call, self.call = self.call, None
        call["status"] = status
        at = self._at(call)
        return [self._ev("response.function_call_arguments.done", **at,
                         arguments=call["arguments"]),
                self._ev("response.output_item.done", output_index=at["output_index"],
                         item=copy.deepcopy(call))]

    # -- the end -----------------------------------------------------------------------------
    def finish(self, reason: str | None, prompt_tokens: int, output_tokens: int) -> list[dict]:
        cut = reason == "length"
        evs: list[dict] = []
        if not self.output:  # an answer of blank text (or none) is still a message
            evs += self._open_message()
            part = self.msg["content"][0]
            part["text"], part["logprobs"] = self.held, self.held_lps
            if self.held:
                evs.append(self._ev("response.output_text.delta", **self._at(self.msg),
                                    content_index=0, delta=self.held, logprobs=self.held_lps))
        status = "incomplete" if cut else "completed"
        evs += self._close_message(status) + self._close_call(status)
        self.status = status
        self.incomplete = {"reason": "max_output_tokens"} if cut else None
        self.completed_at = int(time.time())
        self.usage = {"input_tokens": prompt_tokens,
                      "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                      "output_tokens": output_tokens,
                      "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": prompt_tokens + output_tokens}
        return evs + [self._ev(f"response.{status}", response=self.response())]

    def fail(self, exc: Exception) -> list[dict]:
        """The stream broke after its 200: one terminal `response.failed` carrying the error
        and the output so far. Not also an `error` event: one terminal event is what clients
        expect, and this is the one they all act on (the SDK's stream helper, LangChain and
        the Agents SDK raise on it)."""
        err = exc.to_openai()["error"] if isinstance(exc, LoraplexError) else {
            "message": "internal error while streaming; see the server log",
            "type": "internal_error", "code": None, "param": None}
        for item in (self.msg, self.call):
            if item is not None:  # cut off mid-item
                item["status"] = "incomplete"
        self.status = "failed"
        self.error = {"code": err["code"] or "server_error", "message": err["message"],
                      "param": err["param"], "type": err["type"]}
        return [self._ev("response.failed", response=self.response())]
