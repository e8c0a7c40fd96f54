"""What every generation surface shares: admission, the request's life, streams and errors.

A request's life, in order (chat, completions and responses all follow it):
parse (router) -> resolve the name (no weights) -> render and validate everything the engine
would refuse -> admit and count -> load the adapter -> generate -> a JSON body or an SSE stream.
So a malformed request for a cold adapter never downloads it, and `max_queue` bounds cold loads.

Each surface (serving_chat.py, serving_completion.py, serving_responses.py) subclasses
`ServingBase` and supplies two functions: how the engine's chunks become its stream events, and
how the collected outputs become its JSON body. The rest is here, once.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

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
from loraplex.server.settings import ServerSettings
from loraplex.server.slot_gate import SlotGate

log = logging.getLogger("loraplex.serving")
MODEL_HEADER = "x-loraplex-model"  # the version that answered (`name@N`, or the base's name)


class Admission:
    """The server-wide in-flight count (`max_queue`) and the per-key limiter, shared by all
    surfaces."""

    def __init__(self, settings: ServerSettings, metrics: Metrics, limiter: Limiter | None):
        self.max_queue = settings.max_queue
        self.metrics = metrics
        self.limiter = limiter
        self.in_flight = 0
        # LoRA-aware admission (server/slot_gate.py), shared by every surface like the count.
        self.slots = (SlotGate(settings.max_loras, settings.lora_slot_deadline_s)
                      if settings.lora_slot_gate else None)

    def admit(self, labels: tuple[str, str], endpoint: str,
              principal: Principal | None) -> InFlight:
        """Refused (429) at `max_queue` requests in flight or over the key's rate or
        concurrency limit, else counted until the response is done."""
        if self.in_flight >= self.max_queue:
            raise CapacityExceeded(
                f"{self.in_flight} requests are in flight, the limit (max_queue) is "
                f"{self.max_queue}: retry with backoff")
        permit = (self.limiter.acquire(principal)
                  if self.limiter is not None and principal is not None else None)
        return InFlight(self, labels, endpoint, permit)


class InFlight:
    """One admitted request, from admission until its response is done (streamed body
    included): counted in the in-flight gauge and `max_queue` exactly once, and recorded in
    the requests counter exactly once, whatever ends it."""

    def __init__(self, admission: Admission, labels: tuple[str, str], endpoint: str,
                 permit: Permit | None = None):
        self.admission, self.labels, self.endpoint = admission, labels, endpoint
        self.metrics = admission.metrics
        self.permit = permit  # the key's concurrency slot (server/auth.py), if it has a limit
        self.t0 = time.perf_counter()
        self.recorded = self.released = False
        self.on_release: Callable[[], None] | None = None  # gives back the adapter it holds
        admission.in_flight += 1
        self.metrics.in_flight.inc()

    def record(self, status: str) -> None:
        if not self.recorded:
            self.recorded = True
            self.metrics.requests.labels(*self.labels, self.endpoint, status).inc()

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.record("499")  # nothing else recorded it: the client left before the body began
        if self.permit is not None:
            self.permit.release()
        if self.on_release is not None:
            self.on_release()
        self.admission.in_flight -= 1
        self.metrics.in_flight.dec()
        self.metrics.latency.labels(*self.labels).observe(time.perf_counter() - self.t0)


class _GuardedStream(StreamingResponse):
    """A streaming response that releases its InFlight however the ASGI call ends, also when
    the client is gone before the body starts (then the body generator never runs, and its
    `finally` would not either)."""

    def __init__(self, body: AsyncIterator[bytes], guard: InFlight, headers: dict[str, str]):
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self.guard = guard

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.guard.release()


@dataclass
class Output:
    """Everything one engine request produced, collected (the non-streamed path)."""

    texts: list[str]
    token_ids: list[list[int]]
    logprobs: list[list[TokenLogprob] | None]
    finish: list[str | None]
    prompt_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @classmethod
    def empty(cls, n: int) -> Output:
        return cls([""] * n, [[] for _ in range(n)], [None] * n, [None] * n)

    @property
    def completion_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)


# Turns the engine's chunks (tagged with the index of their GenRequest) into a surface's stream
# events (dicts); and the collected outputs into its JSON body.
Events = Callable[[AsyncIterator[tuple[int, Chunk]]], AsyncIterator[dict]]
Body = Callable[[list[Output]], dict]


@dataclass(frozen=True)
class Framing:
    """How a surface's events go on the wire. Chat and completions: `data: {json}` lines, an
    error event if the stream fails, then `data: [DONE]`. Responses: each event preceded by
    `event: <type>`, a failure reported by the surface's own events (`response.failed`
    carries the response's state), and no `[DONE]`: the terminal event ends the stream."""

    named: bool = False  # an `event: <type>` line before each `data:` line
    error_event: bool = True  # send the OpenAI error object when the stream fails
    done: bool = True  # end with `data: [DONE]`

    def event(self, obj: dict) -> bytes:
        return (f"event: {obj['type']}\n".encode() if self.named else b"") + sse(obj)


DATA_LINES = Framing()
NAMED_EVENTS = Framing(named=True, error_event=False, done=False)


@dataclass
class Prepared:
    """A validated request, ready to admit: its engine requests and how to answer."""

    gens: list[GenRequest]
    version: AdapterVersion | None
    endpoint: str  # metrics label: chat | completions | responses
    stream: bool
    events: Events
    body: Body
    headers: dict[str, str] = field(default_factory=dict)
    framing: Framing = DATA_LINES


class ServingBase:
    def __init__(self, settings: ServerSettings, engine: Engine, manager: AdapterManager,
                 metrics: Metrics, admission: Admission, tokenizer: chat.ChatTokenizer,
                 base_template: str):
        self.settings = settings
        self.engine = engine
        self.manager = manager
        self.metrics = metrics
        self.admission = admission
        self.tokenizer = tokenizer
        self.base_template = base_template

    # -- shared steps ---------------------------------------------------------------------
    def template(self, v: AdapterVersion | None) -> tuple[str, list[str], list[int]]:
        """(chat template, stop tokens, stop token ids) of a version, or of the base."""
        template = (v.chat_template if v and v.chat_template else None) or self.base_template
        stops = (list(v.stop_tokens) if v and v.stop_tokens
                 else self.tokenizer.stop_tokens(template))
        ids = [i for i in (self.tokenizer.token_to_id(t) for t in stops) if i is not None]
        return template, stops, ids

    def budget(self, n_prompt: int, max_new: int | None, param: str = "max_tokens") -> int:
        room = self.engine.max_model_len - n_prompt
        if room <= 0 or (max_new is not None and max_new > room):
            raise BadRequest(
                f"the prompt has {n_prompt} tokens and {max_new or 1} more were asked for, over "
                f"this model's context of {self.engine.max_model_len} tokens: shorten the "
                "prompt or lower max_tokens", param=param, code="context_length_exceeded")
        return max_new if max_new is not None else room

    @staticmethod
    def check_visible(model: str, raw: Request) -> None:
        """An adapter outside the key's set does not exist for it: the unknown-name 404."""
        principal: Principal | None = getattr(raw.state, "principal", None)
        if principal is not None and not principal.can_see(model):
            raise not_found_name(ref_name(model))

    async def resolve(self, model: str, raw: Request, user: str | None = None
                      ) -> AdapterVersion | None:
        self.check_visible(model, raw)
        return await self.manager.resolve(model, user)

    def labels(self, v: AdapterVersion | None) -> tuple[str, str]:
        return (v.name, str(v.version)) if v else (self.settings.served_model_name, "base")

    def sampling(self, req, max_tokens: int) -> SamplingSpec:
        """The sampling fields chat, completions and responses share."""
        temperature = 1.0 if req.temperature is None else req.temperature
        top_k = req.top_k if req.top_k not in (None, -1, 0) else None
        if temperature == 0 and req.n > 1:
            # OpenAI answers n > 1 at temperature 0 (n greedy answers); vLLM refuses greedy
            # n > 1. Sampling from the top-1 token only is greedy decoding by another name.
            temperature, top_k = 1.0, 1
        bias = None
        if req.logit_bias:
            vocab = self.tokenizer.vocab_size
            bias = {int(k): float(b) for k, b in req.logit_bias.items()}
            bad = [k for k in bias if k >= vocab]
            if bad:
                raise BadRequest(f"logit_bias names token id {bad[0]}, outside this model's "
                                 f"vocabulary [0, {vocab})", param="logit_bias")
        if req.stop_token_ids and any(not 0 <= t < self.tokenizer.vocab_size
                                      for t in req.stop_token_ids):
            raise BadRequest(f"stop_token_ids must be in [0, {self.tokenizer.vocab_size})",
                             param="stop_token_ids")
        return SamplingSpec(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=top_k,
            n=req.n, stop=req.stop_list(), seed=req.seed,
            stop_token_ids=list(req.stop_token_ids or []),
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            ignore_eos=req.ignore_eos, min_p=req.min_p,
            repetition_penalty=req.repetition_penalty, min_tokens=req.min_tokens,
            logit_bias=bias, skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
        )

    # -- the run ----------------------------------------------------------------------------
    async def run(self, p: Prepared, raw: Request):
        for gen in p.gens:
            self.engine.check(gen)  # what the engine would refuse is a 400 here
        guard = self.admission.admit(self.labels(p.version), p.endpoint,
                                     getattr(raw.state, "principal", None))
        try:
            lora = None
            if p.version is not None:
                # Held until the response is done (a stream's end included): its disk copy,
                # which the engine may read again, is not evicted meanwhile.
                lora = await self.manager.acquire(p.version)
                guard.on_release = functools.partial(self.manager.release, p.version)
                slots = self.admission.slots
                if slots is not None:  # waits here while `max_loras` other adapters run
                    await slots.enter(lora.int_id)
                    guard.on_release = functools.partial(
                        _release_both, slots, lora.int_id, self.manager, p.version)
            for gen in p.gens:
                gen.lora = lora
            chunks = self._chunks(p.gens, guard)
            # Which version answered: `name`, `name:alias` (a weighted split too) and `name@N`
            # all resolve to one version per request, and only this header says which.
            headers = {**p.headers, MODEL_HEADER: p.version.ref if p.version is not None
                       else self.settings.served_model_name}
            if p.stream:
                return _GuardedStream(self._sse(p, chunks, guard), guard, headers)
            outputs = await _until_disconnected(_collect(chunks, p.gens), raw)
            body = p.body(outputs)
            guard.record("200")
            guard.release()
            return JSONResponse(body, headers=headers)
        except asyncio.CancelledError:
            guard.release()  # the client left while the adapter loaded: recorded as 499
            raise
        except BaseException:
            guard.recorded = True  # the app's error handler records the error status
            guard.release()
            raise

    async def _chunks(self, gens: list[GenRequest], guard: InFlight
                      ) -> AsyncIterator[tuple[int, Chunk]]:
        """The engine's chunks of every GenRequest of the request (a batch of prompts runs
        concurrently in the engine), tagged with the index of their GenRequest."""
        if len(gens) == 1:
            async for chunk in self._timed(gens[0], guard, first=True):
                yield 0, chunk
            return
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int) -> None:
            try:
                async for chunk in self._timed(gens[i], guard, first=i == 0):
                    await queue.put((i, chunk))
                await queue.put(done)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                await queue.put(exc)

        tasks = [asyncio.create_task(pump(i)) for i in range(len(gens))]
        try:
            left = len(gens)
            while left:
                item = await queue.get()
                if item is done:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:  # cancelling a pump aborts its engine request
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _timed(self, gen: GenRequest, guard: InFlight, first: bool
                     ) -> AsyncIterator[Chunk]:
        prompt_tokens = len(gen.prompt_token_ids)
        completion = 0
        try:
            async for chunk in self.engine.generate(gen):
                if first and any(d.token_ids for d in chunk.deltas):
                    self.metrics.ttft.labels(*guard.labels).observe(time.perf_counter() - guard.t0)
                    first = False
                completion += sum(len(d.token_ids) for d in chunk.deltas)
                prompt_tokens = chunk.prompt_tokens
                yield chunk
        finally:
            self.metrics.prompt_tokens.labels(*guard.labels).inc(prompt_tokens)
            self.metrics.completion_tokens.labels(*guard.labels).inc(completion)

    async def _sse(self, p: Prepared, chunks: AsyncIterator[tuple[int, Chunk]],
                   guard: InFlight) -> AsyncIterator[bytes]:
        """The stream's bytes in `p.framing`. After the 200 header a failure can only be
        reported in-band: it ends the stream with an error event (as OpenAI does), is logged
        once and is counted once under its real status; it never just cuts the stream."""
        f = p.framing
        try:
            async for event in p.events(chunks):
                yield f.event(event)
            guard.record("200")
        except LoraplexError as exc:
            guard.record(str(exc.http_status))
            if f.error_event:
                yield sse(exc.to_openai())
        except asyncio.CancelledError:
            guard.record("499")  # client closed the stream: the engine request is aborted
            raise
        except Exception:  # noqa: BLE001 - a stream must end with an error event, never cut
            log.exception("stream %s failed", p.gens[0].request_id)
            guard.record("500")
            if f.error_event:
                yield sse({"error": {"message": "internal error while streaming; see the "
                                     "server log", "type": "internal_error", "param": None,
                                     "code": None}})
        if f.done:
            yield b"data: [DONE]\n\n"


def _release_both(slots, int_id: int, manager, version) -> None:
    slots.leave(int_id)
    manager.release(version)


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


async def _collect(chunks: AsyncIterator[tuple[int, Chunk]], gens: list[GenRequest]
                   ) -> list[Output]:
    outs = [Output.empty(g.sampling.n) for g in gens]
    for o, g in zip(outs, gens):
        o.prompt_tokens = len(g.prompt_token_ids)
    async for i, chunk in chunks:
        out = outs[i]
        out.prompt_tokens = chunk.prompt_tokens
        if chunk.prompt_logprobs is not None:
            out.prompt_logprobs = chunk.prompt_logprobs
        for d in chunk.deltas:
            out.texts[d.index] += d.text
            out.token_ids[d.index] += d.token_ids
            if d.logprobs is not None:
                out.logprobs[d.index] = (out.logprobs[d.index] or []) + d.logprobs
            out.finish[d.index] = d.finish_reason or out.finish[d.index]
    return outs


def finish_reason(reason: str | None) -> str | None:
    return {"abort": "stop"}.get(reason, reason) if reason else None


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
