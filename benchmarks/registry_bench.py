"""Registry benchmark: resolve a reference and list all versions with 1,000 versions registered.

    python benchmarks/registry_bench.py                       # SQLite + local artifacts in a temp dir
    python benchmarks/registry_bench.py --url postgresql+psycopg://u@127.0.0.1:5432/db

Every version is pushed through the public API (`Registry.push`: validation, artifact write,
transaction), spread over `--names` adapters with a `prod` alias on each (every other one a
weighted 90/10 split). Then each operation is timed `--runs` times; the table reports the median
and p95 wall time per call. Target: under 50 ms each. The base and adapter files are written with
numpy + safetensors (no torch), with the shapes of a tiny Llama.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from loraplex.adapters.registry import Registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402

HIDDEN, INTER, LAYERS, RANK = 64, 128, 2, 4
MODULES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
           "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
           "mlp.gate_proj": (HIDDEN, INTER), "mlp.up_proj": (HIDDEN, INTER),
           "mlp.down_proj": (INTER, HIDDEN)}  # suffix -> (in, out)


def write_base(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": 2,
        "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 300}))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|end|>", "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}))
    tensors = {f"model.layers.{i}.{s}.weight": np.zeros((o, n), np.float16)
               for i in range(LAYERS) for s, (n, o) in MODULES.items()}
    save_file(tensors, str(d / "model.safetensors"))
    return d


def write_adapter(d: Path, base: Path) -> Path:
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": str(base), "bias": "none"}))
    rng = np.random.default_rng(0)
    tensors = {}
    for i in range(LAYERS):
        for s in ("self_attn.q_proj", "self_attn.v_proj"):
            n, o = MODULES[s]
            key = f"base_model.model.model.layers.{i}.{s}"
            tensors[f"{key}.lora_A.weight"] = rng.standard_normal((RANK, n), np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.standard_normal((o, RANK), np.float32)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


def timed(fn, runs: int) -> tuple[float, float]:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(0.95 * len(samples)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="registry URL (default: SQLite in a temp dir)")
    ap.add_argument("--versions", type=int, default=1000)
    ap.add_argument("--names", type=int, default=100)
    ap.add_argument("--runs", type=int, default=300)
    args = ap.parse_args()
    machine = loadgen.machine()  # before the work, so its load average is the machine's own

    tmp = Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    try:
        base = write_base(tmp / "base")
        adapter = write_adapter(tmp / "adapter", base)
        reg = Registry(args.url or f"sqlite:///{tmp / 'registry.db'}", str(tmp / "artifacts"))
        reg.register_base("tiny", base)
        names = [f"adapter-{i:03d}" for i in range(args.names)]
        t0 = time.perf_counter()
        for i in range(args.versions):
            (adapter / "NOTES.txt").write_text(str(i))  # distinct content => a new version
            reg.push(adapter, names[i % len(names)])
        push_s = time.perf_counter() - t0
        per_name = args.versions // len(names)
        for j, n in enumerate(names):
            reg.set_alias(n, "prod", f"{per_name - 1}:90,{per_name}:10" if j % 2 else per_name)
        assert len(reg.list()) == args.versions

        rnd = random.Random(0)
        pick = lambda: rnd.choice(names)  # noqa: E731
        ops = [
            ("resolve `name` (prod alias, weighted for half)",
             lambda: reg.resolve(pick(), key=str(rnd.random()))),
            ("resolve `name@N`", lambda: reg.resolve(f"{pick()}@{rnd.randint(1, per_name)}")),
            ("resolve `name:latest`", lambda: reg.resolve(f"{pick()}:latest")),
            (f"list() all {args.versions} versions", lambda: reg.list()),
            ("revision() (server poll)", lambda: reg.revision()),
            ("snapshot() (server refresh)", lambda: reg.snapshot()),
        ]
        snap = reg.snapshot()
        ops.append(("snapshot.resolve(`name`) in memory", lambda: snap.resolve(pick(), key="u")))
        url = reg.url

        def cold_list() -> None:  # a fresh Registry: nothing parsed yet (e.g. a new process)
            fresh = Registry(url, str(tmp / "artifacts"))
            t0 = time.perf_counter()
            fresh.list()
            cold.append((time.perf_counter() - t0) * 1000)
            fresh.close()

        cold: list[float] = []
        for _ in range(max(10, args.runs // 10)):
            cold_list()
        cold.sort()
        rows = [(f"list() all {args.versions} versions, cold (first call of a new Registry)",
                 len(cold), statistics.median(cold), cold[int(0.95 * (len(cold) - 1))])]
        for label, fn in ops:
            runs = args.runs if "list" not in label and "snapshot()" not in label else max(
                30, args.runs // 5)
            med, p95 = timed(fn, runs)
            rows.append((label, runs, med, p95))
        reg.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    backend = "PostgreSQL" if args.url and args.url.startswith("postgres") else "SQLite (WAL)"
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {machine}; backend {backend}")
    print(f"setup: {args.versions} versions over {len(names)} names pushed through "
          f"Registry.push in {push_s:.1f} s ({1000 * push_s / args.versions:.1f} ms/push)\n")
    print("| operation | runs | median ms | p95 ms | target |")
    print("|---|---:|---:|---:|---|")
    for label, runs, med, p95 in rows:
        target = "< 50 ms" if label.startswith(("resolve", "list")) else ""
        print(f"| {label} | {runs} | {med:.2f} | {p95:.2f} | {target} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
