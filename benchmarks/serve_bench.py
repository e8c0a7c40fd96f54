"""P1 and P2: loraplex's serving overhead, and the cost of mixing many adapters.

    .venv/bin/python benchmarks/serve_bench.py [--base /work/toy-model-v2] [--rounds 7] [--p2-vllm]

P1  loraplex ÷ vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`), the
    same engine arguments (see `loadgen.EngineArgs`), the same adapters (vLLM's through
    `--lora-modules`, loraplex's from its registry) and the same load: output tokens/s (target
    ≥0.97, aim ≥1.0) and p50 time to first token (target ≤1.05×). Two workloads: every request
    on the base model, and requests spread over the base and 16 adapters.
P2  through loraplex: 16 distinct adapters mixed ÷ the same load all on one adapter (target
    ≥0.95), and adapters ÷ base (reported; engine-bound on CPU). `--p2-vllm` adds the same
    three loads through vLLM's server for reference.

Both servers run side by side for the whole run; the loads alternate (A B, then B A, ...) so a
busy shared machine slows each side alike, and each ratio is taken within a round, then the
median over rounds is reported; each load also records the server's CPU time per output token
(its whole process tree), the figure least moved by other jobs on the machine. Warm-up (every adapter once, then one full discarded round per
server and workload) keeps adapter loading and first-call costs out of the measurement.
Adapters: PEFT LoRAs of rank 8 on all linear layers with random weights (`loadgen.make_adapters`),
pushed to a fresh SQLite registry; the base is built with `loraplex toy-model` unless --base.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402
from loadgen import EngineArgs, Harness, load, make_jobs, median, table  # noqa: E402

SETTLE_S = 1.0


def measure_rounds(loads: dict[str, tuple], rounds: int, concurrency: int,
                   max_tokens: int) -> dict[str, list[loadgen.LoadResult]]:
    """Run each named load (url, jobs, server process) once per round, alternating the order;
    -> results per name, each with the server's CPU seconds during its load."""
    names = list(loads)
    out: dict[str, list[loadgen.LoadResult]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            url, jobs, proc = loads[n]
            # Both engines' workers are bound to the same core (vLLM's CPU thread binding) and
            # OpenMP threads spin a while after the last step: let the previous load settle.
            time.sleep(SETTLE_S)
            cpu0 = loadgen.cpu_seconds(proc)
            res = load(url, jobs, concurrency, max_tokens)
            res.cpu_s = loadgen.cpu_seconds(proc) - cpu0
            if res.errors:
                raise RuntimeError(f"{n}: {len(res.errors)} failed requests, e.g. {res.errors[0]}")
            out[n].append(res)
            s = res.summary()
            print(f"  round {r + 1} {n:<22} {s['tok_s']:>7.1f} tok/s  ttft p50 "
                  f"{s['ttft_p50_ms']:>6.1f} ms  p90 {s['ttft_p90_ms']:>6.1f} ms  "
                  f"latency p50 {s['lat_p50_ms']:>6.1f} ms  cpu {s['cpu_ms_per_tok']:.2f} ms/tok", flush=True)
    return out


def ratio(results, a: str, b: str, key) -> float:
    """Median over rounds of key(a) / key(b), both from the same round."""
    return median([key(x) / key(y) for x, y in zip(results[a], results[b])])


def tok_s(r: loadgen.LoadResult) -> float:
    return r.tokens_per_s


def ttft50(r: loadgen.LoadResult) -> float:
    return r.pct("ttft_s", 0.5)


def cpu_tok(r: loadgen.LoadResult) -> float:
    return r.cpu_ms_per_token


def row(results, name: str) -> list:
    rs = results[name]
    return [name, f"{median([tok_s(r) for r in rs]):.1f}",
            f"{1000 * median([ttft50(r) for r in rs]):.1f}",
            f"{1000 * median([r.pct('ttft_s', 0.9) for r in rs]):.1f}",
            f"{1000 * median([r.pct('latency_s', 0.5) for r in rs]):.1f}",
            f"{median([cpu_tok(r) for r in rs]):.2f}"]


HEADER = ["load", "output tok/s", "TTFT p50 ms", "TTFT p90 ms", "latency p50 ms",
          "server CPU ms / token"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, help="base model dir (default: build the toy model)")
    p.add_argument("--workdir", type=Path, help="keep files here (default: a temp dir, removed)")
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--max-loras", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=64, help="requests per measured load")
    p.add_argument("--max-tokens", type=int, default=32, help="output tokens per request")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--multiprocessing", default="1", choices=["0", "1"],
                   help="VLLM_ENABLE_V1_MULTIPROCESSING on both sides (1: vLLM's default)")
    p.add_argument("--skip-p1", action="store_true")
    p.add_argument("--skip-p2", action="store_true")
    p.add_argument("--p2-vllm", action="store_true", help="also run the P2 loads through vLLM")
    a = p.parse_args()

    machine = loadgen.machine()
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="serve-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    args = EngineArgs(max_loras=a.max_loras, max_cpu_loras=max(a.max_loras, a.adapters),
                      multiprocessing=a.multiprocessing)
    t_start = time.time()
    try:
        with Harness(workdir) as h:
            base = h.toy_model(a.base)
            print("making adapters ...", flush=True)
            loras = loadgen.make_adapters(base, workdir / "adapters", a.adapters)
            reg = h.registry(base)
            for name, path in loras.items():
                reg.push(path, name, base="toy")
            reg.close()
            need_vllm = not a.skip_p1 or a.p2_vllm
            lp, lurl = h.start_loraplex(base, args)
            vp, vurl = h.start_vllm(base, args, loras) if need_vllm else (None, None)
            print(f"loraplex ready in {h.wait_ready(lp, lurl + '/ready'):.0f}s", flush=True)
            if vp:
                print(f"vLLM ready in {h.wait_ready(vp, vurl + '/health'):.0f}s", flush=True)
            urls = {"loraplex": (lurl + "/v1", lp), **({"vllm": (vurl + "/v1", vp)} if vp else {})}

            names = list(loras)
            mixed = ["toy", *names]  # the base and every adapter, interleaved
            for url, _ in urls.values():  # warm-up: each adapter loaded, first calls done
                load(url, make_jobs(mixed, len(mixed)), len(mixed), 4)

            sections = []
            if not a.skip_p1:
                loads = {}
                # Ordered so that the two servers' runs of one workload are adjacent in time.
                for w, models in (("base", ["toy"]), ("mixed", mixed)):
                    for sysname, (url, proc) in urls.items():
                        loads[f"{sysname} {w}"] = (url, make_jobs(models, a.requests), proc)
                for url, jobs, _ in loads.values():
                    load(url, jobs, a.concurrency, a.max_tokens)  # discarded warm round
                print(f"P1: {a.rounds} rounds, {a.requests} requests x {a.max_tokens} tokens, "
                      f"{a.concurrency} streams", flush=True)
                res = measure_rounds(loads, a.rounds, a.concurrency, a.max_tokens)
                rows = [row(res, n) for n in loads]
                ratios = []
                for w in ("base", "mixed"):
                    t = ratio(res, f"loraplex {w}", f"vllm {w}", tok_s)
                    f = ratio(res, f"loraplex {w}", f"vllm {w}", ttft50)
                    c = ratio(res, f"loraplex {w}", f"vllm {w}", cpu_tok)
                    ratios.append([w, f"{t:.3f}", "yes" if t >= 0.97 else "NO",
                                   f"{f:.3f}", "yes" if f <= 1.05 else "NO", f"{c:.3f}"])
                sections.append(
                    "### P1: loraplex ÷ vLLM's OpenAI server\n\n" + table(HEADER, rows) + "\n\n"
                    + table(["workload", "tok/s ratio", "≥0.97", "TTFT p50 ratio", "≤1.05",
                             "CPU/token ratio"], ratios))
            if not a.skip_p2:
                loads = {}
                for sysname in ["loraplex"] + (["vllm"] if a.p2_vllm else []):
                    url, proc = urls[sysname]
                    loads[f"{sysname} {a.adapters} adapters"] = (url, make_jobs(names, a.requests), proc)
                    loads[f"{sysname} 1 adapter"] = (url, make_jobs(names[:1], a.requests), proc)
                    loads[f"{sysname} base only"] = (url, make_jobs(["toy"], a.requests), proc)
                for url, jobs, _ in loads.values():
                    load(url, jobs, a.concurrency, a.max_tokens)  # discarded warm round
                print(f"P2: {a.rounds} rounds, max_loras={a.max_loras}", flush=True)
                res = measure_rounds(loads, a.rounds, a.concurrency, a.max_tokens)
                rows = [row(res, n) for n in loads]
                ratios = []
                for sysname in ["loraplex"] + (["vllm"] if a.p2_vllm else []):
                    many, one, b = (f"{sysname} {a.adapters} adapters", f"{sysname} 1 adapter",
                                    f"{sysname} base only")
                    m1 = ratio(res, many, one, tok_s)
                    ratios.append([sysname, f"{m1:.3f}", "yes" if m1 >= 0.95 else "NO",
                                   f"{ratio(res, one, b, tok_s):.3f}",
                                   f"{ratio(res, many, b, tok_s):.3f}"])
                sections.append(
                    f"### P2: {a.adapters} adapters mixed ÷ one adapter (max_loras={a.max_loras})"
                    "\n\n" + table(HEADER, rows) + "\n\n"
                    + table(["server", f"{a.adapters} mixed ÷ 1 adapter", "≥0.95",
                             "1 adapter ÷ base", f"{a.adapters} mixed ÷ base"], ratios))
    finally:
        if a.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n## Server benchmarks (serve_bench.py)\n\nMachine: {machine}\n"
          f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/serve_bench.py', *sys.argv[1:]])}`\n"
          f"Engine args (both sides): {args}\n"
          f"Load: {a.requests} requests per load, {a.concurrency} concurrent streams, "
          f"{a.max_tokens} output tokens each (greedy, ignore_eos), {a.rounds} rounds; "
          f"figures are medians over rounds, ratios are medians of per-round ratios. "
          f"Wall time {time.time() - t_start:.0f}s.\n")
    print("\n\n".join(sections))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
