"""vLLM behind the `Engine` interface: the only module of the server that imports vllm.

It runs vLLM's V1 `AsyncLLM` in this process (its engine core may still be a child process),
turns our `GenRequest` into vLLM's tokens prompt + `SamplingParams` + `LoRARequest`, and turns
vLLM's delta outputs back into our `Chunk`s.

It also carries `apply_vllm_fixes`, registered as a vLLM general plugin (pyproject's
`vllm.general_plugins` entry point) so it runs in every vLLM process, the engine core included.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from loraplex.adapters.errors import BadRequest, ConfigError, NotReady
from loraplex.server.interface import (
    Chunk,
    CompletionDelta,
    GenRequest,
    LoraRef,
    SamplingSpec,
    TokenLogprob,
)
from loraplex.server.settings import ENGINE_FIELDS, ServerSettings

log = logging.getLogger("loraplex.engine")


# Set by loraplex itself: serving adapters and vLLM's own vllm:* metrics depend on them.
_FIXED = {"enable_lora": True, "disable_log_stats": False}
# EngineArgs a user may not set through engine_args, and what to use instead.
_RESERVED = {
    "model": "--model / LORAPLEX_MODEL",
    "served_model_name": "--served-model-name / LORAPLEX_SERVED_MODEL_NAME",
    "revision": "--revision / LORAPLEX_REVISION (or --model org/name@REVISION)",
    "enable_lora": "nothing: loraplex always enables LoRA",
    "disable_log_stats": "nothing: loraplex keeps vLLM's stats for /metrics",
}


def _engine_args_class():
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs


def engine_arg_names() -> frozenset[str]:
    """The fields of vLLM's AsyncEngineArgs (EngineArgs plus the async server's own)."""
    return frozenset(f.name for f in dataclasses.fields(_engine_args_class()))


def check_engine_args(extra: dict[str, Any], names: frozenset[str] | None = None) -> None:
    """ConfigError naming every `engine_args` key vLLM's EngineArgs has no field for (with close
    matches), or that a typed loraplex setting or loraplex itself owns."""
    names = engine_arg_names() if names is None else names
    problems = []
    for key in extra:
        if key in ENGINE_FIELDS:
            problems.append(f"{key!r} is a loraplex setting: use {_flag(key)}")
        elif key in _RESERVED:
            problems.append(f"{key!r} is set by loraplex: use {_RESERVED[key]}")
        elif key not in names:
            close = difflib.get_close_matches(key, sorted(names | set(ENGINE_FIELDS)), n=3, cutoff=0.6)
            said = [f"{c!r} ({_flag(c)})" if c in ENGINE_FIELDS else repr(c) for c in close]
            hint = f"; did you mean {' or '.join(said)}?" if close else (
                "; `vllm serve --help` lists the engine arguments (as --dashed-names)")
            problems.append(f"{key!r} is not a field of vLLM {_vllm_version()}'s EngineArgs{hint}")
    if problems:
        raise ConfigError("--engine-arg / LORAPLEX_ENGINE_ARGS:" + (
            " " + problems[0] if len(problems) == 1 else "".join(f"\n  - {p}" for p in problems)),
            param="engine_args")


def _flag(field: str) -> str:
    return f"--{field.replace('_', '-')} / LORAPLEX_{field.upper()}"


def _vllm_version() -> str:
    try:
        from vllm import __version__

        return str(__version__)
    except ImportError:  # pragma: no cover
        return "?"


def engine_kwargs(settings: ServerSettings) -> dict[str, Any]:
    """The keyword arguments of vLLM's AsyncEngineArgs for these settings: the ENGINE_FIELDS
    that are set (None keeps vLLM's default), loraplex's fixed ones, then `engine_args`.
    `settings.model` must already be a local directory (see loraplex.adapters.models)."""
    kwargs: dict[str, Any] = {"model": str(settings.model), "served_model_name": [settings.served_model_name]}
    for field in ENGINE_FIELDS:
        value = getattr(settings, field)
        if value is not None:
            kwargs[field] = value
    kwargs.update(_FIXED)
    kwargs.update(settings.engine_args)
    return kwargs


def build_engine_args(settings: ServerSettings):
    """vLLM's AsyncEngineArgs for these settings, `engine_args` keys checked against its fields.

    Pure: nothing is loaded and no engine starts. Raises ConfigError for a bad key."""
    cls = _engine_args_class()
    check_engine_args(settings.engine_args, frozenset(f.name for f in dataclasses.fields(cls)))
    try:
        return cls(**engine_kwargs(settings))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"vLLM rejected the engine arguments: {exc}", param="engine_args") from None


_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingSpec)} | {"min_tokens"}


def _bad_request(exc: Exception) -> BadRequest:
    message = str(exc)
    param = getattr(exc, "parameter", None) or _param_named_in(message)
    return BadRequest(f"{message.rstrip('.')}: change {param or 'the request'} and retry",
                      param=param)


def _param_named_in(message: str) -> str | None:
    """vLLM's messages start with the field they are about ("n must be 1 when ...")."""
    first = message.split(maxsplit=1)[0] if message.strip() else ""
    return first if first in _SAMPLING_FIELDS else None


def _skip_rows_without_lora(op, zero: str):
    """Wrap a CPU torch LoRA op so rows whose adapter index is -1 get no LoRA delta.

    vLLM marks base-model tokens with index -1. Its Triton kernels skip them, but the CPU
    torch ops gather `weights[indices]`, and -1 selects the *last* adapter slot: a base
    request batched beside adapter requests silently gets an adapter's delta (seen here:
    the toy base answered with the `upper` adapter's output; upstream vllm#48421, #49656,
    open for 0.32). Zeroing those rows (the shrink output, or the expand input) makes the
    delta exactly zero and leaves rows with a real index bit-for-bit unchanged.
    """

    def fixed(inputs, weights, output, indices, *args, **kwargs):
        none = indices < 0
        if not bool(none.any()):
            return op(inputs, weights, output, indices, *args, **kwargs)
        safe = indices.clamp(min=0)
        if zero == "input":
            inputs = inputs.masked_fill(none[: inputs.shape[0], None], 0)
            return op(inputs, weights, output, safe, *args, **kwargs)
        result = op(inputs, weights, output, safe, *args, **kwargs)
        output[: none.shape[0]][none[: output.shape[0]]] = 0
        return result

    fixed.__loraplex_fixed__ = True
    return fixed


def _prompt_logprobs_safe(add_lora_logits):
    """Wrap `PunicaWrapperCPU.add_lora_logits` for steps that score prompt tokens.

    With prompt logprobs (completions `echo` + `logprobs`: lm-evaluation-harness's
    log-likelihood requests), the logits of every prompt token of a request go through the
    lm_head LoRA with the step's one-index-per-request list; with two requests in the step the
    shapes disagree and the engine dies (`einsum(): subscript b has size 7 ... 18`; vllm#16668,
    #51594, open). An lm_head LoRA is never loaded here (the registry accepts adapters on the
    layers' linear modules only), so its delta is exactly zero: skip it when the rows do not
    match the indices. Anything else runs vLLM's own op unchanged.
    """
    def fixed(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
        if x.view(-1, x.shape[-1]).size(0) != self.sampler_indices.size(0):
            if not bool(lora_b_stacked.any()):
                return None
            raise NotImplementedError("an lm_head LoRA with prompt logprobs in a batched step")
        return add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale,
                               buffer=buffer, **kwargs)

    fixed.__loraplex_fixed__ = True
    return fixed


def apply_vllm_fixes() -> None:
    """vLLM general plugin: add our worker RPC, patch the CPU LoRA ops (idempotent)."""
    from vllm.platforms import current_platform
    from vllm.v1.worker.worker_base import WorkerBase

    # A method *name* is the one form of collective_rpc that works both in-process and across
    # vLLM's worker processes (a pickled function gets pickled twice on the multiprocess path).
    WorkerBase.loraplex_lora_residency = _worker_lora_residency
    WorkerBase.loraplex_prefetch_lora = _worker_prefetch_lora
    WorkerBase.loraplex_pin_lora = _worker_pin_lora
    WorkerBase.loraplex_unpin_lora = _worker_unpin_lora
    from vllm.lora.worker_manager import WorkerLoRAManager

    if not _ORIGINAL_LOAD:
        _ORIGINAL_LOAD.append(WorkerLoRAManager._load_adapter)
        WorkerLoRAManager._load_adapter = _load_adapter_prefetched
    if not current_platform.is_cpu():
        return
    import vllm.lora.ops.torch_ops as ops_pkg
    import vllm.lora.ops.torch_ops.lora_ops as ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    if not getattr(punica_cpu.PunicaWrapperCPU.add_lora_logits, "__loraplex_fixed__", False):
        punica_cpu.PunicaWrapperCPU.add_lora_logits = _prompt_logprobs_safe(
            punica_cpu.PunicaWrapperCPU.add_lora_logits)
    if getattr(ops.bgmv_shrink, "__loraplex_fixed__", False):
        return
    fixed = {
        "bgmv_shrink": _skip_rows_without_lora(ops.bgmv_shrink, zero="output"),
        "bgmv_expand": _skip_rows_without_lora(ops.bgmv_expand, zero="input"),
        "bgmv_expand_slice": _skip_rows_without_lora(ops.bgmv_expand_slice, zero="input"),
    }
    # sgmv_* (prefill) call the bgmv_* module globals; punica_cpu bound the names at import.
    for module in (ops, ops_pkg, punica_cpu):
        for name, fn in fixed.items():
            if hasattr(module, name):
                setattr(module, name, fn)
    log.info("applied the CPU LoRA no-adapter-row fix (vllm#48421)")


class VllmEngine:
    """`Engine` over vLLM's AsyncLLM."""

    def __init__(self, settings: ServerSettings):
        # Built (and checked) here, so a bad engine argument fails before the server starts.
        self.args = build_engine_args(settings)
        self.cpu_kvcache_space_gib = settings.cpu_kvcache_space_gib
        self.max_model_len = settings.max_model_len or 0  # the engine's own value once started
        self._llm = None
        # The engine's adapter reads from disk (counts and seconds), as of the last
        # lora_residency() call; None until then or when the engine cannot tell.
        self.lora_loads: dict[str, float] | None = None

    async def start(self) -> None:
        if self.cpu_kvcache_space_gib is not None:
            # vLLM reads this from the environment at engine start on CPU.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self.cpu_kvcache_space_gib)
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        if current_platform.is_cpu():
            # oneDNN caches one compiled primitive per distinct shape (up to 1024), and the CPU
            # engine runs every step at a new token count: the worker's heap grew for thousands
            # of requests (docs/soak.md). Off, memory is flat and throughput unchanged
            # (benchmarks/onednn_cache.py). Read by oneDNN at first use, in this process and in
            # the engine's workers, which inherit the environment; an operator's value wins.
            os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")
        apply_vllm_fixes()
        self._llm = AsyncLLM.from_engine_args(self.args)
        self.max_model_len = self._llm.model_config.max_model_len

    async def stop(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    @property
    def ready(self) -> bool:
        return self._llm is not None and not self._llm.errored

    async def check_health(self) -> None:
        if self._llm is None:
            raise RuntimeError("engine not started")
        await self._llm.check_health()

    @staticmethod
    def _dead() -> NotReady:
        # vLLM does not restart a dead engine core: /health fails so the pod is restarted, and
        # until then every request is a 503 a client retries (on another replica).
        return NotReady("the inference engine has stopped (see the server log) and this server "
                        "is restarting; retry shortly")

    # -- adapters -----------------------------------------------------------------------
    @staticmethod
    def _lora_request(lora: LoraRef):
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora_name=lora.key, lora_int_id=lora.int_id, lora_path=lora.path)

    async def add_lora(self, lora: LoraRef) -> None:
        await self._llm.add_lora(self._lora_request(lora))

    async def remove_lora(self, lora: LoraRef) -> None:
        await self._llm.remove_lora(lora.int_id)

    async def pin_lora(self, lora: LoraRef) -> None:
        # Not vLLM's pin_lora: it pins in the host LRU *and* in a batch slot, while the
        # scheduler still admits max_loras other adapters per step, and the first step that
        # does kills the engine (KeyError in convert_mapping: one of them lost its slot to the
        # pin). A host pin is what keeps the adapter's requests off disk reads; the slots stay
        # the scheduler's.
        await self._llm.collective_rpc("loraplex_pin_lora",
                                       args=(lora.key, lora.int_id, lora.path))

    async def unpin_lora(self, lora: LoraRef) -> None:
        # vLLM has no unpin of its own. Dropping and re-adding the adapter (what this did
        # before) re-read its files inside the engine loop; releasing the mark reads nothing
        # and leaves the adapter where it is (host LRU, a batch slot if it has one).
        await self._llm.collective_rpc("loraplex_unpin_lora", args=(lora.int_id,))

    async def lora_residency(self) -> dict[int, set[str]] | None:
        # vLLM's public API only lists the host-cache ids; the batch slots live on the worker,
        # so ask it directly (a method apply_vllm_fixes added to vLLM's workers).
        try:
            per_worker = await self._llm.collective_rpc("loraplex_lora_residency")
        except Exception as exc:  # an internal API moved: fall back to what the server knows
            log.debug("lora residency unavailable: %s", exc)
            return None
        out: dict[int, set[str]] = {}
        for worker in per_worker:
            if worker is None:
                return None
            for tier in ("accelerator", "host", "pinned"):
                for i in worker.get(tier, ()):
                    out.setdefault(int(i), set()).add(tier)
        # Every worker of a tensor-parallel group reads its own shard of each adapter at the
        # same moment: the first worker's counts are the engine's.
        self.lora_loads = per_worker[0].get("loads") if per_worker else None
        return out

    async def prefetch_lora(self, lora: LoraRef) -> None:
        # Sent before the request that needs it: the engine core runs it between steps, ahead
        # of that request (see _worker_prefetch_lora).
        try:
            await self._llm.collective_rpc("loraplex_prefetch_lora",
                                           args=(lora.key, lora.int_id, lora.path))
        except Exception as exc:  # an optimisation: the step reads it itself
            log.debug("prefetch of %s failed: %s", lora.key, exc)

    # -- generation ---------------------------------------------------------------------
    def _sampling_params(self, req: GenRequest):
        from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

        s = req.sampling
        structured = None
        if s.json_schema is not None:
            structured = StructuredOutputsParams(json=s.json_schema)
        elif s.json_object:
            structured = StructuredOutputsParams(json_object=True)
        elif s.structural_tag is not None:
            structured = StructuredOutputsParams(structural_tag=s.structural_tag)
        return SamplingParams(
            n=s.n,
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k is not None else 0,
            seed=s.seed,
            stop=s.stop or None,
            stop_token_ids=s.stop_token_ids or None,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            logprobs=s.logprobs,
            prompt_logprobs=s.prompt_logprobs,
            ignore_eos=s.ignore_eos,
            min_p=s.min_p,
            repetition_penalty=s.repetition_penalty,
            min_tokens=s.min_tokens,
            logit_bias=s.logit_bias,
            skip_special_tokens=s.skip_special_tokens,
            include_stop_str_in_output=s.include_stop_str_in_output,
            structured_outputs=structured,
            output_kind=RequestOutputKind.DELTA,
        )

    def check(self, req: GenRequest) -> None:
        """vLLM's own validation of the sampling parameters, as a 400 naming the parameter."""
        from vllm.exceptions import VLLMClientError

        try:
            self._sampling_params(req)
        except (ValueError, VLLMClientError) as exc:
            raise _bad_request(exc) from None

    async def generate(self, req: GenRequest) -> AsyncIterator[Chunk]:
        from vllm.inputs import TokensPrompt

        if not self.ready:
            raise self._dead()
        params = self._sampling_params(req)
        lora = self._lora_request(req.lora) if req.lora else None
        stream = self._llm.generate(
            TokensPrompt(prompt_token_ids=req.prompt_token_ids), params, req.request_id,
            lora_request=lora,
        )
        from vllm.exceptions import VLLMClientError

        finished = False
        try:
            try:
                out = await anext(stream)
            except StopAsyncIteration:
                return
            except (ValueError, VLLMClientError) as exc:
                # Refused when the engine took the request (its own input checks): the
                # client's fault, a 400 (or, mid-stream, an error event), not a 500.
                finished = True
                raise _bad_request(exc) from None
            prompt_lps = _prompt_logprobs(out, req.sampling.prompt_logprobs)
            while True:
                finished = out.finished
                yield Chunk(
                    deltas=[_delta(o, req.sampling.logprobs) for o in out.outputs],
                    prompt_tokens=len(out.prompt_token_ids or req.prompt_token_ids),
                    finished=out.finished,
                    prompt_logprobs=prompt_lps,
                )
                prompt_lps = None
                try:
                    out = await anext(stream)
                except StopAsyncIteration:
                    return
        except Exception as exc:
            if not self.ready:  # the engine died under the request (vLLM's EngineDeadError)
                raise self._dead() from exc
            raise
        finally:
            if not finished and self.ready:  # the client went away or the caller stopped early
                await self._llm.abort(req.request_id)

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)


def _worker_lora_residency(worker) -> dict[str, Any] | None:
    """Runs inside a vLLM worker: ids in the accelerator batch slots, in the host LRU and
    pinned there, and this worker's adapter loads from disk (`_LOADS`)."""
    try:
        mgr = worker.model_runner.lora_manager._adapter_manager
        host = mgr._registered_adapters
        return {"accelerator": list(mgr._active_adapters.cache), "host": list(host.cache),
                "pinned": [i for i in host.pinned_items if i in host.cache],
                "loads": dict(_LOADS)}
    except AttributeError:
        return None


def _worker_pin_lora(worker, name: str, int_id: int, path: str) -> bool:
    """Runs inside a vLLM worker: add the adapter to the host LRU (a read if it is not there)
    and pin it there, in one call, so no step in between can evict it. Not in a batch slot (see
    VllmEngine.pin_lora). The server keeps pins to max_cpu_loras - max_loras, so a batch of
    unpinned adapters always fits beside them."""
    from vllm.lora.request import LoRARequest

    wm = worker.model_runner.lora_manager
    wm.add_adapter(LoRARequest(lora_name=name, lora_int_id=int_id, lora_path=path))
    wm._adapter_manager._registered_adapters.pin(int_id)
    return True


def _worker_unpin_lora(worker, int_id: int) -> bool:
    """Runs inside a vLLM worker: let the host LRU evict the adapter again (nothing is read or
    moved). True if it was pinned."""
    host = worker.model_runner.lora_manager._adapter_manager._registered_adapters
    if int_id not in host.pinned_items:
        return False
    host.pinned_items.discard(int_id)
    return True


# -- adapter prefetch, inside each vLLM worker ----------------------------------------------------
# vLLM reads an adapter's files (safetensors -> LoRAModel) when a step first schedules a request
# for it and the adapter is not in the worker's host LRU (`max_cpu_loras`): inside that step, so
# every request in the batch waits for the read. With many adapters and skewed traffic that is
# most steps that admit a rare adapter. The server announces each adapter it is about to submit
# (`prefetch_lora`, sent ahead of the request); a worker that does not hold it starts the read
# on a thread of its own, which runs beside the steps (the model's kernels release the GIL), and
# the step that needs it takes the result, waiting only for what is left of the read.
_LOADS = {"blocking": 0, "prefetched": 0, "seconds": 0.0, "step_wait_seconds": 0.0}
_PREFETCHED: dict[int, Any] = {}  # lora int id -> (path, Future[LoRAModel]), insertion-ordered
_MAX_PREFETCHED = 64  # announced but never scheduled (aborted requests): dropped, oldest first
_pool = None


def _worker_prefetch_lora(worker, name: str, int_id: int, path: str) -> bool:
    """Runs inside a vLLM worker (between steps): start reading the adapter unless it is in the
    host LRU or already being read. True if a read started."""
    global _pool
    from concurrent.futures import ThreadPoolExecutor

    from vllm.lora.request import LoRARequest

    wm = getattr(worker.model_runner, "lora_manager", None)
    if wm is None or int_id in wm.list_adapters() or int_id in _PREFETCHED:
        return False
    if _pool is None:
        _pool = ThreadPoolExecutor(1, thread_name_prefix="loraplex-lora-prefetch")
    req = LoRARequest(lora_name=name, lora_int_id=int_id, lora_path=path)
    _PREFETCHED[int_id] = (path, _pool.submit(_timed_read, wm, req))
    while len(_PREFETCHED) > _MAX_PREFETCHED:
        _PREFETCHED.pop(next(iter(_PREFETCHED)))
    return True


def _timed_read(wm, req):
    t0 = time.perf_counter()
    lora = _ORIGINAL_LOAD[0](wm, req)
    _LOADS["seconds"] += time.perf_counter() - t0
    return lora


def _load_adapter_prefetched(self, lora_request):
    """`WorkerLoRAManager._load_adapter`, taking a prefetched read when there is one (for the
    same files); otherwise vLLM's own read, counted. A failed prefetch reads again here, so the
    error a bad adapter gets is vLLM's own, raised where vLLM raises it."""
    got = _PREFETCHED.pop(lora_request.lora_int_id, None)
    if got is not None and got[0] == lora_request.lora_path and not lora_request.load_inplace:
        t0 = time.perf_counter()
        try:
            lora = got[1].result()
        except Exception:  # noqa: BLE001 - read again below, where vLLM reports it
            pass
        else:
            _LOADS["prefetched"] += 1
            _LOADS["step_wait_seconds"] += time.perf_counter() - t0
            return lora
    _LOADS["blocking"] += 1
    t0 = time.perf_counter()
    try:
        return _ORIGINAL_LOAD[0](self, lora_request)
    finally:
        dt = time.perf_counter() - t0
        _LOADS["seconds"] += dt
        _LOADS["step_wait_seconds"] += dt


_ORIGINAL_LOAD: list = []


def _token_logprob(token_id: int, alternatives: dict, k: int) -> TokenLogprob:
    """vLLM's {token id: Logprob} at one position -> the chosen token and the top k."""
    chosen = alternatives[token_id]
    ranked = sorted(alternatives.values(), key=lambda lp: lp.rank or 0)[:k]
    return TokenLogprob(
        token=chosen.decoded_token or "",
        logprob=max(chosen.logprob, -9999.0),  # -inf is not JSON
        top=[(a.decoded_token or "", max(a.logprob, -9999.0)) for a in ranked],
    )


def _prompt_logprobs(out, want: int | None) -> list[TokenLogprob | None] | None:
    if want is None or out.prompt_logprobs is None:
        return None
    ids = out.prompt_token_ids or []
    return [None if alts is None else _token_logprob(t, alts, want)
            for t, alts in zip(ids, out.prompt_logprobs)]


def _delta(o, want_logprobs: int | None) -> CompletionDelta:
    lps = None
    if want_logprobs is not None and o.logprobs is not None:
        lps = [_token_logprob(t, alts, want_logprobs)
               for t, alts in zip(o.token_ids, o.logprobs)]
    return CompletionDelta(
        index=o.index, text=o.text, token_ids=list(o.token_ids), logprobs=lps,
        finish_reason=o.finish_reason,
    )
