"""P3: the first request for a registered, never-loaded adapter, and push -> servable.

    .venv/bin/python benchmarks/cold_adapter_bench.py [--base /work/toy-model-v2] [--trials 6]

Cold TTFT  Each trial takes a fresh adapter, registered but never requested (not in the disk
           cache, not in the engine), and measures the time to the first streamed token of a
           chat request through `loraplex serve` (HTTP, `openai` client). In the same run, a
           subprocess drives vLLM's AsyncLLM directly with the same engine arguments, the same
           prompt token ids and a LoRARequest it has never seen: the engine's own cold-adapter
           TTFT. The two alternate trial by trial. Target: loraplex ≤ engine + 50 ms (medians).
           Warm TTFT (the same adapter again) is measured on both sides for reference.
Push       `Registry.push` of a new adapter while the server runs (poll interval 2 s), then
           (a) requests naming it, retried every 20 ms: time from the push's return to the
           first 200 (an unknown name makes the server re-read the registry at once), and
           (b) no requests, only GET /v1/models every 20 ms: time until it is listed (the
           poller's path; pushed at a random moment of the poll cycle). Target: servable
           within the poll interval.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402
from loadgen import EngineArgs, Harness, median, table  # noqa: E402

QUESTION = [{"role": "user", "content": "Is a pear a fruit or a thing?"}]
MAX_TOKENS = 4
SETTLE_S = 1.0


# -- the engine side: a subprocess that answers one line per trial -----------------------------

async def engine_worker(base: str, args: EngineArgs, prompt_ids: list[int]) -> None:
    """Read `cold NAME ID PATH` lines on stdin; answer {"cold_ms", "warm_ms"} lines on stdout."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import RequestOutputKind, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=base, enable_lora=True, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
        max_cpu_loras=args.max_cpu_loras, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=True, dtype=args.dtype, enforce_eager=True, seed=args.seed,
        gpu_memory_utilization=args.gpu_memory_utilization, disable_log_stats=False))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)

    async def ttft(lora) -> float:
        t0 = time.perf_counter()
        first = None
        async for out in llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params,
                                      uuid.uuid4().hex, lora_request=lora):
            if first is None and out.outputs[0].token_ids:
                first = time.perf_counter() - t0
        return first

    await ttft(None)
    await ttft(None)
    print(json.dumps({"ready": True}), flush=True)
    loop = asyncio.get_running_loop()
    while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
        _, name, int_id, path = line.split()
        lora = LoRARequest(lora_name=name, lora_int_id=int(int_id), lora_path=path)
        cold = await ttft(lora)
        warm = await ttft(lora)
        print(json.dumps({"cold_ms": 1000 * cold, "warm_ms": 1000 * warm}), flush=True)
    llm.shutdown()


# -- the loraplex side -------------------------------------------------------------------------

def stream_ttft(client, model: str) -> float:
    t0 = time.perf_counter()
    first = None
    for chunk in client.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0, stream=True,
            extra_body={"ignore_eos": True}):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
    return first if first is not None else time.perf_counter() - t0


def load_ms(url: str, name: str) -> float:
    """The server's own record of loading `name` (fetch, sha256, validate, engine add_lora)."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith("loraplex_adapter_load_seconds_sum{") and f'adapter="{name}"' in line:
            return 1000 * float(line.rsplit(" ", 1)[1])
    return float("nan")


def push_to_first_200(reg, client, path: Path, name: str) -> tuple[float, float, int]:
    """(push seconds, push return -> first 200 seconds, attempts)."""
    import openai

    t0 = time.perf_counter()
    reg.push(path, name, base="toy")
    t1 = time.perf_counter()
    attempts = 0
    while True:
        attempts += 1
        try:
            client.chat.completions.create(model=name, messages=QUESTION, max_tokens=1,
                                           temperature=0)
            return t1 - t0, time.perf_counter() - t1, attempts
        except openai.NotFoundError:
            if time.perf_counter() - t1 > 30:
                raise
            time.sleep(0.02)


def push_to_listed(reg, client, path: Path, name: str, poll_interval: float) -> float:
    time.sleep(random.uniform(0, poll_interval))  # a random moment in the poller's cycle
    reg.push(path, name, base="toy")
    t1 = time.perf_counter()
    while name not in {m.id for m in client.models.list().data}:
        if time.perf_counter() - t1 > 30:
            raise RuntimeError(f"{name} not listed after 30 s")
        time.sleep(0.02)
    return time.perf_counter() - t1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, help="base model dir (default: build the toy model)")
    p.add_argument("--workdir", type=Path, help="keep files here (default: a temp dir, removed)")
    p.add_argument("--trials", type=int, default=6, help="cold adapters per side")
    p.add_argument("--push-trials", type=int, default=4)
    p.add_argument("--poll-interval", type=float, default=2.0)
    p.add_argument("--multiprocessing", default="1", choices=["0", "1"])
    p.add_argument("--engine-worker", help=argparse.SUPPRESS)  # internal: JSON config
    a = p.parse_args()
    if a.engine_worker:
        cfg = json.loads(a.engine_worker)
        asyncio.run(engine_worker(cfg["base"], EngineArgs(**cfg["args"]), cfg["prompt_ids"]))
        return 0

    from openai import OpenAI

    machine = loadgen.machine()
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="cold-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    args = EngineArgs(max_loras=4, max_cpu_loras=16, multiprocessing=a.multiprocessing)
    n_push = 2 * a.push_trials
    t_start = time.time()
    try:
        with Harness(workdir) as h:
            base = h.toy_model(a.base)
            print("making adapters ...", flush=True)
            loras = list(loadgen.make_adapters(base, workdir / "adapters",
                                               a.trials + n_push).values())
            cold, pushed = loras[: a.trials], loras[a.trials:]
            reg = h.registry(base)
            for i, path in enumerate(cold):
                reg.push(path, f"cold{i:02d}", base="toy")
            lp, lurl = h.start_loraplex(base, args, poll_interval_s=a.poll_interval)
            print(f"loraplex ready in {h.wait_ready(lp, lurl + '/ready'):.0f}s", flush=True)
            import httpx

            ids = httpx.post(lurl + "/v1/render", json={"model": "toy", "messages": QUESTION},
                             timeout=30).json()["token_ids"]
            cfg = json.dumps({"base": str(base), "args": asdict(args), "prompt_ids": ids})
            eng = subprocess.Popen([sys.executable, __file__, "--engine-worker", cfg],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                   stderr=(workdir / "engine.log").open("w"),
                                   env=loadgen.base_env(args), start_new_session=True)
            h.procs.append((eng, workdir / "engine.log"))

            def engine_reply() -> dict:
                for line in eng.stdout:
                    if line.startswith("{"):
                        return json.loads(line)
                raise RuntimeError("engine worker died:\n" + (workdir / "engine.log").read_text()[-3000:])

            engine_reply()  # ready
            client = OpenAI(base_url=lurl + "/v1", api_key="none", max_retries=0, timeout=60)
            stream_ttft(client, "toy")  # the HTTP path warm
            rows, lp_cold, lp_warm, lp_load, en_cold, en_warm = [], [], [], [], [], []
            for i, path in enumerate(cold):
                def ours(i=i):
                    c = stream_ttft(client, f"cold{i:02d}")
                    lp_cold.append(1000 * c)
                    lp_load.append(load_ms(lurl, f"cold{i:02d}"))
                    lp_warm.append(1000 * stream_ttft(client, f"cold{i:02d}"))

                def engine(i=i, path=path):
                    eng.stdin.write(f"cold engine{i:02d} {1000 + i} {path}\n")
                    eng.stdin.flush()
                    r = engine_reply()
                    en_cold.append(r["cold_ms"])
                    en_warm.append(r["warm_ms"])
                for step in ((ours, engine) if i % 2 == 0 else (engine, ours)):
                    # Both engines' workers sit on the same core (vLLM's CPU thread binding) and
                    # OpenMP threads spin a while after each step: let the other side's settle.
                    time.sleep(SETTLE_S)
                    step()
                rows.append([i + 1, f"{lp_cold[-1]:.1f}", f"{lp_load[-1]:.1f}", f"{en_cold[-1]:.1f}",
                             f"{lp_cold[-1] - en_cold[-1]:+.1f}", f"{lp_warm[-1]:.1f}",
                             f"{en_warm[-1]:.1f}"])
                print("  trial", *rows[-1], flush=True)
            eng.stdin.close()
            eng.wait(60)

            push_rows = []
            for j in range(a.push_trials):
                push_s, to200, attempts = push_to_first_200(reg, client, pushed[2 * j], f"new{j:02d}")
                listed = push_to_listed(reg, client, pushed[2 * j + 1], f"listed{j:02d}",
                                        a.poll_interval)
                push_rows.append([j + 1, f"{1000 * push_s:.0f}", f"{1000 * to200:.0f}", attempts,
                                  f"{1000 * listed:.0f}"])
                print("  push", *push_rows[-1], flush=True)
            reg.close()
    finally:
        if a.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    d = median(lp_cold) - median(en_cold)
    worst_200 = max(float(r[2]) for r in push_rows)
    worst_list = max(float(r[4]) for r in push_rows)
    print(f"\n## P3: cold adapter (cold_adapter_bench.py)\n\nMachine: {machine}\n"
          f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/cold_adapter_bench.py', *sys.argv[1:]])}`\n"
          f"Engine args (both sides): {args}\n"
          f"Request: one chat message ({len(ids)} prompt tokens), {MAX_TOKENS} output tokens, "
          f"greedy, streamed. Wall time {time.time() - t_start:.0f}s.\n")
    print(table(["trial", "loraplex cold TTFT ms", "of which adapter load ms",
                 "engine cold TTFT ms", "difference ms",
                 "loraplex warm TTFT ms", "engine warm TTFT ms"], rows))
    print()
    print(table(["", "loraplex", "engine (AsyncLLM)", "difference", "target"], [
        ["cold TTFT p50 ms", f"{median(lp_cold):.1f}", f"{median(en_cold):.1f}", f"{d:+.1f}",
         f"≤ +50 ms: {'yes' if d <= 50 else 'NO'}"],
        ["adapter load p50 ms (loraplex's metric)", f"{median(lp_load):.1f}", "", "", ""],
        ["warm TTFT p50 ms", f"{median(lp_warm):.1f}", f"{median(en_warm):.1f}",
         f"{median(lp_warm) - median(en_warm):+.1f}", ""]]))
    print()
    print(table(["push trial", "push ms", "push -> first 200 ms", "requests sent",
                 "push -> listed in /v1/models ms"], push_rows))
    ok = max(worst_200, worst_list) <= 1000 * a.poll_interval
    print(f"\nWorst push -> first 200: {worst_200:.0f} ms; worst push -> listed: {worst_list:.0f} ms; "
          f"poll interval {1000 * a.poll_interval:.0f} ms: {'within' if ok else 'NOT within'}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
