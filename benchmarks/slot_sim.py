"""How many requests can run per step when adapters outnumber slots: a step-level simulation.

    .venv/bin/python benchmarks/slot_sim.py [--step-ms 11.7,1.02,0] [--adapters 200]
        [--alpha 1.0] [--max-loras 8] [--concurrency 32] [--max-tokens 16] [--requests 320]
        [--seeds 20] [--policy gate:2 --policy slots:16 ...]
    .venv/bin/python benchmarks/slot_sim.py --calibrate --base <model> [--dtype auto]

`many_adapters.py` measures Zipf ÷ one adapter at `max_loras 8` at 0.64-0.77 on both servers
and 0.91-0.96 with a slot per stream (docs/benchmarks.md, issue 15). This script asks how much
of that any admission order can win back. It replays the benchmark's closed loop (the same
Zipf draw, `concurrency` streams, `max_tokens` tokens each) against a model of the engine that
keeps only what decides batch size:
- a step gives one token to every running request; a request's first token ends the step that
  admits it (prefill and first token in one step, as vLLM's chunked prefill does for short
  prompts); it leaves after `max_tokens` steps, and its stream sends the next request at once;
- a step batches requests for at most `max_loras` distinct adapters, and running requests are
  never preempted (the KV cache holds all of them);
- a step takes t0 + t1·(requests) + t2·(distinct adapters) ms: `--step-ms t0,t1,t2`, measured
  on the real engine by `--calibrate` (vLLM's offline `LLM` on `--base`, batches of 1-32
  requests over one adapter and over `max_loras` adapters; least squares).

Admission policies (`--policy`, repeatable):
- `vllm`: vLLM's own scheduler rule alone: the waiting queue first come, first served; a request
  whose adapter would be one adapter too many is skipped this step.
- `gate:D`: loraplex's slot gate (`loraplex.server.slot_gate.SlotGate`, the server's own class
  run on the simulated clock) in front of that rule, with a deadline of D seconds.
- `linger:H`: vLLM's rule, but an adapter keeps its slot for H steps after its last request
  ends, so the next request for a popular adapter finds it (a rule considered for issue 15).
- `fcfs`: strict first come, first served: no request passes one that waits for a slot (the
  fairest order; what it costs in batch size).
- `bypass:D`: vLLM's rule until a request that waits for a slot has waited D seconds, then
  strict first come, first served behind it (between the two).
- `reserve:K`: vLLM's rule, but the K most popular adapters always hold a slot (pinned in the
  batch from known popularity; the others share `max_loras - K` slots).
- `slots:N`: vLLM's rule with N slots instead of `max_loras` (what more slots buy).
Every policy is also run with all requests naming one adapter, the benchmark's baseline.

Reported per policy, summed over `--seeds` draws of `--requests` requests: mean requests per
step and per busy slot (each request holds its adapter's slot for all its steps, so requests per
step <= `max_loras` x requests per busy slot: 32 streams on 8 slots need 4 requests sharing
each slot), output tok/s and TTFT p50/p99 from the step-time model, and the ratios to the
one-adapter load and to vLLM's rule. It is a model: it leaves out the HTTP front, the host LRU's reloads and the machine's
noise, which the benchmark measures. Its uses: rank admission rules before measuring them with
the benchmark, and size `max_loras` for a traffic mix (the `slots:N` rows; deploy/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from many_adapters import pct, sample_adapters  # noqa: E402


@dataclass
class Job:
    adapter: int
    sent: float  # simulated seconds
    tokens: int = 0


@dataclass
class StepModel:
    """Step time in seconds: t0 + t1 * requests + t2 * distinct adapters (all in ms)."""

    t0: float
    t1: float
    t2: float = 0.0

    def __call__(self, requests: int, adapters: int) -> float:
        return (self.t0 + self.t1 * requests + self.t2 * adapters) / 1000

    @classmethod
    def parse(cls, s: str) -> StepModel:
        parts = [float(x) for x in s.split(",")]
        if not 2 <= len(parts) <= 3 or any(x < 0 for x in parts):
            raise ValueError(f"--step-ms wants t0,t1[,t2] in ms (non-negative), not {s!r}")
        return cls(*parts)


@dataclass
class Outcome:
    seconds: float = 0.0
    steps: int = 0
    requests_run: int = 0  # sum over steps of the running batch size
    slot_steps: int = 0  # sum over steps of the distinct adapters in the batch
    tokens: int = 0
    ttfts: list[float] = field(default_factory=list)

    @property
    def per_step(self) -> float:
        return self.requests_run / self.steps

    @property
    def per_slot(self) -> float:
        """Requests per busy slot per step: requests / step <= max_loras x this."""
        return self.requests_run / self.slot_steps

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


# name -> the type of its number (None: it takes none)
POLICIES = {"vllm": None, "fcfs": None, "gate": float, "bypass": float, "linger": int,
            "reserve": int, "slots": int}


def parse_policy(s: str) -> tuple[str, float | int | None]:
    """'gate:2' -> ('gate', 2.0): a known name, with a number >= 0 where it takes one."""
    kind, _, arg = s.partition(":")
    if kind not in POLICIES:
        raise ValueError(f"unknown policy {s!r}: use one of vllm, fcfs, gate:D, bypass:D, "
                         "linger:H, reserve:K, slots:N")
    typ = POLICIES[kind]
    if typ is None:
        if arg:
            raise ValueError(f"policy {kind!r} takes no number, not {s!r}")
        return kind, None
    try:
        n = typ(arg)
    except ValueError:
        n = -1
    if n < 0 or (kind == "slots" and n < 1):
        raise ValueError(f"policy {s!r} needs {'an integer' if typ is int else 'a number'} "
                         f"{'>= 1' if kind == 'slots' else '>= 0'} after the colon, "
                         f"e.g. {kind}:2")
    return kind, n


async def simulate(adapters: list[int], policy: str, slots: int, concurrency: int,
                   max_tokens: int, step: StepModel) -> Outcome:
    """One closed-loop load of `adapters` (one request each, in order) under `policy`."""
    now = 0.0
    kind, arg = parse_policy(policy)
    if kind == "slots":
        slots, kind = arg, "vllm"
    gate = None
    if kind == "gate":
        from loraplex.server.slot_gate import SlotGate
        gate = SlotGate(slots, arg, clock=lambda: now)
    linger = arg if kind == "linger" else 0
    reserved = set(range(arg)) if kind == "reserve" else set()
    lingering: dict[int, int] = {}  # adapter -> steps its empty slot is still held
    queue: list[Job] = []  # the engine's waiting queue, in arrival order
    running: list[Job] = []
    held: list[tuple[asyncio.Task, Job]] = []  # requests waiting in the gate
    todo = iter(adapters)
    out = Outcome()

    def send() -> None:
        a = next(todo, None)
        if a is None:
            return
        job = Job(a, now)
        if gate is None:
            queue.append(job)
        else:
            held.append((asyncio.ensure_future(gate.enter(a)), job))

    def admit() -> None:
        # vLLM's rule: first come, first served; skip a request whose adapter is one too many.
        active = {j.adapter for j in running} | set(lingering) | reserved
        for job in list(queue):
            if job.adapter in active or len(active) < slots:
                active.add(job.adapter)
                lingering.pop(job.adapter, None)
                queue.remove(job)
                running.append(job)
            elif kind == "fcfs" or (kind == "bypass" and now - job.sent >= arg):
                break

    for _ in range(concurrency):
        send()
    while running or queue or held:
        if gate is not None:
            for _ in range(3):  # let granted `enter` calls return
                await asyncio.sleep(0)
            queue.extend(j for t, j in held if t.done())
            held = [(t, j) for t, j in held if not t.done()]
        admit()
        if not running and lingering:  # an idle engine holds no slot for a request to come
            lingering.clear()
            admit()
        busy = len({j.adapter for j in running})
        if busy > slots:
            raise AssertionError(f"{policy}: a step batched more than {slots} adapters")
        if not running:
            raise RuntimeError(f"{policy}: nothing runs with {len(queue)} queued, "
                               f"{len(held)} held: the policy deadlocked")
        now += step(len(running), busy)
        out.steps += 1
        out.requests_run += len(running)
        out.slot_steps += busy
        for a in list(lingering):
            lingering[a] -= 1
            if lingering[a] <= 0:
                del lingering[a]
        done = []
        for job in running:
            job.tokens += 1
            if job.tokens == 1:
                out.ttfts.append(now - job.sent)
            if job.tokens == max_tokens:
                done.append(job)
        for job in done:
            running.remove(job)
            out.tokens += max_tokens
            if gate is not None:
                gate.leave(job.adapter)
            if linger and not any(j.adapter == job.adapter for j in running):
                lingering[job.adapter] = linger
            send()
    out.seconds = now
    return out


def run_policy(policy: str, draws: list[list[int]], a) -> tuple[Outcome, Outcome]:
    """(Zipf, one adapter) outcomes summed over the draws."""
    total = {"zipf": Outcome(), "one": Outcome()}
    for adapters in draws:
        for name, seq in (("zipf", adapters), ("one", [0] * len(adapters))):
            o = asyncio.run(simulate(seq, policy, a.max_loras, a.concurrency, a.max_tokens,
                                     a.step))
            t = total[name]
            for f in fields(Outcome):
                setattr(t, f.name, getattr(t, f.name) + getattr(o, f.name))
    return total["zipf"], total["one"]


# -- calibration on the real engine -----------------------------------------------------------

def calibrate(base: Path, max_loras: int, max_tokens: int, dtype: str) -> StepModel:
    """Time `max_tokens`-token greedy batches of 1..32 requests over 1 and `max_loras` adapters
    on vLLM's offline engine (in-process) and fit the step model."""
    import os
    import tempfile

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    work = Path(tempfile.mkdtemp(prefix="slot-sim-"))
    try:
        return _time_steps(base, work, max_loras, max_tokens, dtype)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _time_steps(base: Path, work: Path, max_loras: int, max_tokens: int, dtype: str) -> StepModel:
    import loadgen
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    loras = loadgen.make_adapters(base, work, max_loras,
                                  ranks=[(8, 16)[i % 2] for i in range(max_loras)])
    llm = LLM(model=str(base), dtype=dtype, enable_lora=True, max_loras=max_loras,
              max_lora_rank=16, max_cpu_loras=max(32, max_loras), max_model_len=512,
              max_num_seqs=64, seed=0)
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    reqs = [LoRARequest(n, i + 1, str(p)) for i, (n, p) in enumerate(sorted(loras.items()))]
    prompt = "Write a short note about the weather in a small town by the sea."
    rows = []  # (requests, adapters, seconds per step)
    llm.generate([prompt] * 8, sp, lora_request=[reqs[i % max_loras] for i in range(8)])  # warm
    for b in (1, 2, 4, 8, 16, 32):
        for k in sorted({1, min(b, max_loras)}):
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                llm.generate([prompt] * b, sp, lora_request=[reqs[i % k] for i in range(b)],
                             use_tqdm=False)
                best = min(best, (time.perf_counter() - t) / max_tokens)
            rows.append((b, k, best))
            print(f"  batch {b:2d}, {k} adapter(s): {1000 * best:.1f} ms per step", flush=True)
    import numpy as np

    x = np.array([[1, b, k] for b, k, _ in rows], dtype=float)
    y = np.array([1000 * s for _, _, s in rows])
    t0, t1, t2 = np.linalg.lstsq(x, y, rcond=None)[0]
    return StepModel(max(t0, 0.0), max(t1, 0.0), max(t2, 0.0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # The default: the toy model on vLLM's CPU engine, float32, measured by --calibrate on the
    # 2-CPU VM (docs/benchmarks.md). Calibrate on the machine and model you size for.
    p.add_argument("--step-ms", default="11.7,1.02,0", help="t0,t1[,t2]: step time model, ms")
    p.add_argument("--calibrate", action="store_true", help="measure --step-ms on the engine")
    p.add_argument("--base", type=Path, help="the base model for --calibrate")
    p.add_argument("--dtype", default="float32", help="the engine's dtype for --calibrate")
    p.add_argument("--adapters", type=int, default=200)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--requests", type=int, default=320)
    p.add_argument("--seeds", type=int, default=20, help="draws (seed 0 is the benchmark's)")
    p.add_argument("--policy", action="append",
                   help="vllm | fcfs | gate:D | bypass:D | linger:H | reserve:K | slots:N "
                        "(repeatable; default: a set of each; vllm always runs first)")
    p.add_argument("--json", type=Path, help="write the figures here")
    a = p.parse_args()
    try:
        a.step = StepModel.parse(a.step_ms)
        for pol in a.policy or []:
            parse_policy(pol)
    except ValueError as e:
        p.error(str(e))
    if a.calibrate:
        if a.base is None:
            p.error("--calibrate needs --base")
        a.step = calibrate(a.base, a.max_loras, a.max_tokens, a.dtype)
        print(f"fitted --step-ms {a.step.t0:.2f},{a.step.t1:.3f},{a.step.t2:.3f}")
    policies = a.policy or ["fcfs", "gate:0.5", "gate:2", "gate:1000", "bypass:0.5",
                            "linger:4", "reserve:1", "reserve:2", f"slots:{2 * a.max_loras}",
                            f"slots:{a.concurrency}"]
    policies = ["vllm"] + [x for x in policies if x != "vllm"]  # the reference row
    draws = [sample_adapters(a.adapters, a.requests, a.alpha, seed)
             for seed in range(a.seeds)]
    print(f"{a.adapters} adapters, Zipf({a.alpha}), {a.seeds} draws of {a.requests} requests, "
          f"{a.concurrency} streams, {a.max_tokens} tokens, max_loras {a.max_loras}, step "
          f"{a.step.t0:g} + {a.step.t1:g}/request + {a.step.t2:g}/adapter ms")
    print("| policy | requests / step, Zipf | requests / busy slot, Zipf | Zipf ÷ one, tok/s "
          "| ÷ vllm, Zipf tok/s | Zipf TTFT p50 s | Zipf TTFT p99 s | ÷ vllm, Zipf TTFT p99 |")
    print("|---|---|---|---|---|---|---|---|")
    results = {}
    for pol in policies:
        z, one = run_policy(pol, draws, a)
        r = results[pol] = dict(
            zipf_per_step=z.per_step, zipf_per_slot=z.per_slot, one_per_step=one.per_step,
            zipf_tok_s=z.tok_s,
            zipf_over_one=z.tok_s / one.tok_s, ttft_p50=pct(z.ttfts, 0.5),
            ttft_p99=pct(z.ttfts, 0.99))
        ref = results["vllm"]
        print(f"| {pol} | {z.per_step:.1f} | {z.per_slot:.2f} | {r['zipf_over_one']:.3f} | "
              f"{z.tok_s / ref['zipf_tok_s']:.3f} | {r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | "
              f"{r['ttft_p99'] / ref['ttft_p99']:.3f} |", flush=True)
    if a.json:
        a.json.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(a).items()},
                                          results=results), indent=1))


if __name__ == "__main__":
    main()
