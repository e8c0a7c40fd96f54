"""Chat and text completions: resolve the adapter, render, generate, stream or aggregate.

A chat request is rendered with the chat template of the adapter version it names (from the
registry record), by the same `loraplex.adapters.chat.render` the trainer builds its labels
with, and sent to the engine as token ids plus that template's stop token ids. vLLM V1 applies
one chat template per server; doing it here is what lets every adapter keep its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from loraplex.adapters import chat
from loraplex.adapters.errors import BadRequest, CapacityExceeded, LoraplexError
from loraplex.adapters.records import AdapterVersion, not_found_name
from loraplex.adapters.refs import ref_name
from loraplex.server.auth import Limiter, Permit, Principal
from loraplex.server.interface import Chunk, Engine, GenRequest, SamplingSpec, TokenLogprob
from loraplex.server.lora_manager import AdapterManager
from loraplex.server.metrics import Metrics
from loraplex.server.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RenderRequest,
)
from loraplex.server.settings import ServerSettings

log = logging.getLogger("loraplex.serving")


class InFlight:
    """One admitted request, from admission until its response is done (streamed body
    included): counted in the in-flight gauge and `max_queue` exactly once, and recorded in
    the requests counter exactly once, whatever ends it."""

    def __init__(self, serving: OpenAIServing, labels: tuple[str, str], endpoint: str,
                 permit: Permit | None = None):
        self.serving, self.labels, self.endpoint = serving, labels, endpoint
        self.permit = permit  # the key's concurrency slot (server/auth.py), if it has a limit
        self.t0 = time.perf_counter()
        self.recorded = self.released = False
        serving.in_flight += 1
        serving.metrics.in_flight.inc()

    def record(self, status: str) -> None:
        if not self.recorded:
            self.recorded = True
            self.serving.metrics.requests.labels(*self.labels, self.endpoint, status).inc()

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.record("499")  # nothing else recorded it: the client left before the body began
        if self.permit is not None:
            self.permit.release()
        self.serving.in_flight -= 1
        self.serving.metrics.in_flight.dec()
        self.serving.metrics.latency.labels(*self.labels).observe(time.perf_counter() - self.t0)


class _GuardedStream(StreamingResponse):
    """A streaming response that releases its InFlight however the ASGI call ends, also when
    the client is gone before the body starts (then the body generator never runs, and its
    `finally` would not either)."""

    def __init__(self, body: AsyncIterator[bytes], guard: InFlight):
        super().__init__(body, media_type="text/event-stream")
        self.guard = guard

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.guard.release()


class OpenAIServing:
    def __init__(self, settings: ServerSettings, engine: Engine, manager: AdapterManager,
                 metrics: Metrics, limiter: Limiter | None = None):
        self.settings = settings
        self.engine = engine
        self.manager = manager
        self.metrics = metrics
        self.limiter = limiter
        self.tokenizer = chat.load_tokenizer(settings.model)
        self.base_template = chat.resolve_template(None, settings.model)
        self.in_flight = 0

    # -- shared steps ---------------------------------------------------------------------
    def _template(self, v: AdapterVersion | None) -> tuple[str, list[str], list[int]]:
        template = (v.chat_template if v and v.chat_template else None) or self.base_template
        stops = (list(v.stop_tokens) if v and v.stop_tokens
                 else self.tokenizer.stop_tokens(template))
        ids = [i for i in (self.tokenizer.token_to_id(t) for t in stops) if i is not None]
        return template, stops, ids

    def _render(self, v: AdapterVersion | None, messages, add_generation_prompt=True):
        template, stops, stop_ids = self._template(v)
        try:
            rendered = chat.render(template, messages, self.tokenizer,
                                   add_generation_prompt=add_generation_prompt)
        except BadRequest as exc:
            exc.param = exc.param or "messages"
            raise
        return rendered, stops, stop_ids

    def _budget(self, n_prompt: int, max_new: int | None, param: str) -> int:
        room = self.engine.max_model_len - n_prompt
        if room <= 0 or (max_new is not None and max_new > room):
            raise BadRequest(
                f"the prompt has {n_prompt} tokens and {max_new or 1} more were asked for, over "
                f"this model's context of {self.engine.max_model_len} tokens: shorten the "
                "prompt or lower max_tokens", param=param, code="context_length_exceeded")
        return max_new if max_new is not None else room

    def _admit(self, version: AdapterVersion | None, endpoint: str,
               principal: Principal | None) -> InFlight:
        """Admission: refused (429) at `max_queue` requests in flight or over the key's rate or
        concurrency limit, else counted until the response is done. Comes after every check
        that needs no adapter weights and before the adapter is loaded, so a cold load is
        bounded by `max_queue` too."""
        if self.in_flight >= self.settings.max_queue:
            raise CapacityExceeded(
                f"{self.in_flight} requests are in flight, the limit (max_queue) is "
                f"{self.settings.max_queue}: retry with backoff")
        permit = (self.limiter.acquire(principal)
                  if self.limiter is not None and principal is not None else None)
        return InFlight(self, self._labels(version), endpoint, permit)

    @staticmethod
    def check_visible(model: str, raw: Request) -> None:
        """An adapter outside the key's set does not exist for it: the unknown-name 404."""
        principal: Principal | None = getattr(raw.state, "principal", None)
        if principal is not None and not principal.can_see(model):
            raise not_found_name(ref_name(model))

    def _labels(self, v: AdapterVersion | None) -> tuple[str, str]:
        return (v.name, str(v.version)) if v else (self.settings.served_model_name, "base")

    # -- endpoints ------------------------------------------------------------------------
    # A request's life: parse (router) -> resolve the name (no weights) -> render and validate
    # everything the engine would refuse -> admit and count -> load the adapter -> generate.
    # So a malformed request for a cold adapter never downloads it.
    async def chat(self, req: ChatCompletionRequest, raw: Request):
        self.check_visible(req.model, raw)
        version = await self.manager.resolve(req.model, req.user)
        rendered, _, stop_ids = self._render(version, req.messages)
        ids = rendered.token_ids
        sampling = self._sampling(req, self._budget(len(ids), req.max_new_tokens(), "max_tokens"))
        if not req.ignore_eos:
            sampling.stop_token_ids = stop_ids
        if req.logprobs:
            sampling.logprobs = req.top_logprobs or 0
        rf = req.response_format
        if rf is not None and rf.type == "json_object":
            sampling.json_object = True
        elif rf is not None and rf.type == "json_schema":
            sampling.json_schema = rf.json_schema.schema_
        gen = GenRequest(f"chatcmpl-{uuid.uuid4().hex}", ids, sampling)
        return await self._run(gen, req, version, raw, kind="chat")

    async def completion(self, req: CompletionRequest, raw: Request):
        prompts = self._prompts(req.prompt)
        if len(prompts) != 1:
            raise BadRequest("send one prompt per request (batches of prompts are not supported)",
                             param="prompt")
        self.check_visible(req.model, raw)
        version = await self.manager.resolve(req.model, req.user)
        ids = prompts[0]
        sampling = self._sampling(req, self._budget(len(ids), req.max_tokens, "max_tokens"))
        sampling.logprobs = req.logprobs
        gen = GenRequest(f"cmpl-{uuid.uuid4().hex}", ids, sampling)
        return await self._run(gen, req, version, raw, kind="text")

    async def _run(self, gen: GenRequest, req, version, raw: Request, kind: str):
        self.engine.check(gen)  # what the engine would refuse is a 400 here, not a dead stream
        guard = self._admit(version, "chat" if kind == "chat" else "completions",
                            getattr(raw.state, "principal", None))
        try:
            gen.lora = await self.manager.ensure_loaded(version) if version else None
            return await self._respond(gen, req, raw, kind, guard)
        except asyncio.CancelledError:
            guard.release()  # the client left while the adapter loaded: recorded as 499
            raise
        except BaseException:
            guard.recorded = True  # the app's error handler records the error status
            guard.release()
            raise

    def render(self, req: RenderRequest, version: AdapterVersion | None) -> dict:
        rendered, stops, stop_ids = self._render(version, req.messages,
                                                 req.add_generation_prompt)
        return {
            "model": req.model,
            "adapter": version.ref if version else None,
            "chat_template_sha256": version.chat_template_sha256 if version else None,
            "prompt": rendered.text,
            "token_ids": rendered.token_ids,
            "stop_tokens": stops,
            "stop_token_ids": stop_ids,
        }

    # -- helpers --------------------------------------------------------------------------
    def _prompts(self, prompt) -> list[list[int]]:
        """A prompt as text, token ids, or a list of either -> token id lists (checked)."""
        if isinstance(prompt, str) or (prompt and all(isinstance(p, int) for p in prompt)):
            prompt = [prompt]
        out = [self.tokenizer.encode_prompt(p) if isinstance(p, str) else list(p)
               for p in prompt]
        if not out or any(not p for p in out):
            raise BadRequest("prompt is empty", param="prompt")
        vocab = self.tokenizer.vocab_size
        for p in out:
            if any(not 0 <= t < vocab for t in p):
                raise BadRequest(f"prompt token ids must be in [0, {vocab})", param="prompt")
        return out

    @staticmethod
    def _sampling(req, max_tokens: int) -> SamplingSpec:
        temperature = 1.0 if req.temperature is None else req.temperature
        top_k = None
        if temperature == 0 and req.n > 1:
            # OpenAI answers n > 1 at temperature 0 (n greedy answers); vLLM refuses greedy
            # n > 1. Sampling from the top-1 token only is greedy decoding by another name.
            temperature, top_k = 1.0, 1
        return SamplingSpec(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=top_k,
            n=req.n, stop=req.stop_list(), seed=req.seed,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            ignore_eos=req.ignore_eos,
        )

    async def _respond(self, gen: GenRequest, req, raw: Request, kind: str, guard: InFlight):
        stream = self._timed(gen, guard.labels, guard.t0)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _GuardedStream(self._sse(stream, gen, req, kind, include_usage, guard), guard)
        result = await _until_disconnected(_collect(stream, gen.sampling.n), raw)
        guard.record("200")
        guard.release()
        return JSONResponse(_final_body(gen, req, kind, *result))

    async def _timed(self, gen: GenRequest, labels, t0: float) -> AsyncIterator[Chunk]:
        first = True
        prompt_tokens = len(gen.prompt_token_ids)
        completion = 0
        try:
            async for chunk in self.engine.generate(gen):
                if first and any(d.token_ids for d in chunk.deltas):
                    self.metrics.ttft.labels(*labels).observe(time.perf_counter() - t0)
                    first = False
                completion += sum(len(d.token_ids) for d in chunk.deltas)
                prompt_tokens = chunk.prompt_tokens
                yield chunk
        finally:
            self.metrics.prompt_tokens.labels(*labels).inc(prompt_tokens)
            self.metrics.completion_tokens.labels(*labels).inc(completion)

    async def _sse(self, stream, gen, req, kind, include_usage, guard: InFlight):
        created = int(time.time())
        usage = [len(gen.prompt_token_ids), 0]
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        try:
            if kind == "chat":  # OpenAI sends the role first, alone
                yield _sse({"id": gen.request_id, "object": obj,
                            "created": created, "model": req.model, "choices": [
                                {"index": i, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}
                                for i in range(gen.sampling.n)]})
            async for chunk in stream:
                usage[0] = chunk.prompt_tokens
                choices = []
                for d in chunk.deltas:
                    usage[1] += len(d.token_ids)
                    if not d.text and not d.finish_reason and not d.token_ids:
                        continue
                    if kind == "chat":
                        choices.append({"index": d.index, "delta": {"content": d.text},
                                        "logprobs": _chat_logprobs(d.logprobs),
                                        "finish_reason": _finish(d.finish_reason)})
                    else:
                        choices.append({"index": d.index, "text": d.text,
                                        "logprobs": _text_logprobs(d.logprobs),
                                        "finish_reason": _finish(d.finish_reason)})
                if choices:
                    yield _sse({"id": gen.request_id, "created": created, "model": req.model,
                                "object": obj, "choices": choices,
                                **({"usage": None} if include_usage else {})})
            if include_usage:
                yield _sse({"id": gen.request_id, "created": created, "model": req.model,
                            "object": obj, "choices": [], "usage": _usage(*usage)})
            guard.record("200")
        except LoraplexError as exc:  # after the 200 header: report in-band, as OpenAI does
            guard.record(str(exc.http_status))
            yield _sse(exc.to_openai())
        except asyncio.CancelledError:
            guard.record("499")  # client closed the stream: the engine request is aborted
            raise
        except Exception:  # noqa: BLE001 - a stream must end with an error event, never cut
            log.exception("stream %s failed", gen.request_id)
            guard.record("500")
            yield _sse({"error": {"message": "internal error while streaming; see the server "
                                  "log", "type": "internal_error", "param": None, "code": None}})
        yield b"data: [DONE]\n\n"


async def _until_disconnected(coro, raw: Request):
    """Run `coro`, cancelling it (and so aborting the engine request) if the client leaves."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await raw.is_disconnected():
                task.cancel()
                raise asyncio.CancelledError("client disconnected")
    finally:
        if not task.done():
            task.cancel()


async def _collect(stream: AsyncIterator[Chunk], n: int):
    texts = [""] * n
    lps: list[list[TokenLogprob] | None] = [None] * n
    finish: list[str | None] = [None] * n
    usage = [0, 0]
    async for chunk in stream:
        usage[0] = chunk.prompt_tokens
        for d in chunk.deltas:
            texts[d.index] += d.text
            usage[1] += len(d.token_ids)
            if d.logprobs is not None:
                lps[d.index] = (lps[d.index] or []) + d.logprobs
            finish[d.index] = d.finish_reason or finish[d.index]
    return texts, lps, finish, usage


def _final_body(gen: GenRequest, req, kind: str, texts, lps, finish, usage) -> dict:
    if kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": _chat_logprobs(lps[i]), "finish_reason": _finish(finish[i])}
                   for i in range(len(texts))]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": texts[i], "logprobs": _text_logprobs(lps[i]),
                    "finish_reason": _finish(finish[i])} for i in range(len(texts))]
        obj = "text_completion"
    return {"id": gen.request_id, "object": obj, "created": int(time.time()), "model": req.model,
            "choices": choices, "usage": _usage(*usage)}


def _finish(reason: str | None) -> str | None:
    return {"abort": "stop"}.get(reason, reason) if reason else None


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _chat_logprobs(lps: list[TokenLogprob] | None):
    if lps is None:
        return None
    entry = lambda t, lp: {"token": t, "logprob": lp, "bytes": list(t.encode())}  # noqa: E731
    return {"content": [{**entry(x.token, x.logprob),
                         "top_logprobs": [entry(t, lp) for t, lp in x.top]} for x in lps]}


def _text_logprobs(lps: list[TokenLogprob] | None):
    if lps is None:
        return None
    offsets, pos = [], 0
    for x in lps:
        offsets.append(pos)
        pos += len(x.token)
    return {"tokens": [x.token for x in lps], "token_logprobs": [x.logprob for x in lps],
            "top_logprobs": [dict(x.top) for x in lps], "text_offset": offsets}


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
