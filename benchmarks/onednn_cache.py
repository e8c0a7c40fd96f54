"""oneDNN's primitive cache on vLLM's CPU engine: throughput with the cache off, bounded, and
at oneDNN's default, side by side.

    .venv/bin/python benchmarks/onednn_cache.py [--base DIR] [--capacities default,0,64] [--rounds 5]

Why: the soak (benchmarks/soak.py, docs/soak.md) found the CPU worker's heap growing for
thousands of requests, and traced it to oneDNN's primitive cache (one compiled primitive per
distinct shape; vLLM's CPU engine runs each step at a new token count). Turning the cache off
keeps memory flat; this measures what it costs. One `loraplex serve` per capacity runs for the
whole benchmark (`ONEDNN_PRIMITIVE_CACHE_CAPACITY` set in its environment, or left unset for
"default"); the same load (base and 8 adapters interleaved, streamed chat, greedy, ignore_eos)
goes to each in alternating order every round, and the ratio to "default" is taken within each
round, then the median over rounds is reported, with each server's CPU time per output token.
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
import serve_bench  # noqa: E402
from loadgen import EngineArgs, Harness, load, make_jobs, table  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, help="base model dir (default: build the toy model)")
    p.add_argument("--capacities", default="default,0,64",
                   help="comma-separated ONEDNN_PRIMITIVE_CACHE_CAPACITY values ('default': unset)")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=64, help="requests per measured load")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()

    caps = a.capacities.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="onednn-bench-"))
    args = EngineArgs(max_loras=a.adapters, max_cpu_loras=a.adapters)
    t0 = time.time()
    try:
        with Harness(workdir) as h:
            base = h.toy_model(a.base)
            loras = loadgen.make_adapters(base, workdir / "adapters", a.adapters)
            reg = h.registry(base)
            for name, path in loras.items():
                reg.push(path, name, base="toy")
            reg.close()
            servers = {}
            for cap in caps:
                extra = {} if cap == "default" else {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": cap}
                proc, url = h.start_loraplex(base, args, name=f"loraplex-{cap}", env_extra=extra)
                servers[cap] = (proc, url)
            for cap, (proc, url) in servers.items():
                print(f"capacity {cap}: ready in {h.wait_ready(proc, url + '/ready'):.0f}s", flush=True)
            models = ["toy", *loras]
            loads = {f"capacity {cap}": (url + "/v1", make_jobs(models, a.requests), proc)
                     for cap, (proc, url) in servers.items()}
            for url, jobs, _ in loads.values():
                load(url, jobs, a.concurrency, a.max_tokens)  # discarded warm round
            res = serve_bench.measure_rounds(loads, a.rounds, a.concurrency, a.max_tokens)
            rows = [serve_bench.row(res, n) for n in loads]
            ratios = []
            for n in loads:
                if n == "capacity default":
                    continue
                ratios.append([n, f"{serve_bench.ratio(res, n, 'capacity default', serve_bench.tok_s):.3f}",
                               f"{serve_bench.ratio(res, n, 'capacity default', serve_bench.cpu_tok):.3f}"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n## oneDNN primitive cache (onednn_cache.py)\n\nMachine: {loadgen.machine()}\n"
          f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/onednn_cache.py', *sys.argv[1:]])}`\n"
          f"Load: {a.requests} requests per load over the base and {a.adapters} adapters, "
          f"{a.concurrency} streams, {a.max_tokens} tokens each, {a.rounds} rounds (medians). "
          f"Wall time {time.time() - t0:.0f}s.\n")
    print(table(serve_bench.HEADER, rows))
    print()
    if ratios:
        print(table(["setting", "tok/s ÷ default", "CPU/token ÷ default"], ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
