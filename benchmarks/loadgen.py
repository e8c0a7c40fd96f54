"""A small async load generator on the official `openai` client, and the harness the server
benchmarks share (toy model, adapters, a temp registry, servers on loopback ports).

    .venv/bin/python benchmarks/loadgen.py --url http://127.0.0.1:8000/v1 --model toy \
        --concurrency 8 --requests 64 --max-tokens 32

Load: `concurrency` streams, each taking the next job from a fixed list (model, messages) until
the list is done. Every request is greedy (temperature 0, fixed seed) with `ignore_eos` (an extra
body field both vLLM's server and loraplex accept) and a fixed `max_tokens`, so both servers
generate exactly the same number of tokens, and streams with `include_usage`, so the token
count is the server's own. Measured: output tokens/s over the wall time of the whole batch,
time to first token (first chunk with text) and request latency, p50/p90.

The harness (`Harness`) runs servers as subprocesses in their own session, with their logs in
the work dir, and always stops them (SIGTERM, then SIGKILL) when the benchmark ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# A few fixed, short chat prompts (the toy model's context is small): every system sees the same.
PROMPTS = [
    "List three animals that live on a farm.",
    "What colour is the sky on a clear day?",
    "Is a pear a fruit or a thing?",
    "Count the items: cup, lamp, book, park.",
    "Say something about the lake in the morning.",
    "Which is bigger, a dog or a bird?",
    "Name a red fruit and a blue thing.",
    "Write a short sentence about a green park.",
]


# -- the load generator ------------------------------------------------------------------------

@dataclass
class Job:
    model: str
    messages: list[dict]


@dataclass
class LoadResult:
    requests: int
    output_tokens: int
    wall_s: float
    ttft_s: list[float]
    latency_s: list[float]
    errors: list[str] = field(default_factory=list)
    cpu_s: float = float("nan")  # the server's CPU seconds during the load, when measured

    @property
    def cpu_ms_per_token(self) -> float:
        return 1000 * self.cpu_s / self.output_tokens

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    def pct(self, which: str, q: float) -> float:
        xs = sorted(getattr(self, which))
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    def summary(self) -> dict:
        return {"requests": self.requests, "output_tokens": self.output_tokens,
                "wall_s": round(self.wall_s, 3), "tok_s": round(self.tokens_per_s, 1),
                "ttft_p50_ms": round(1000 * self.pct("ttft_s", 0.5), 1),
                "ttft_p90_ms": round(1000 * self.pct("ttft_s", 0.9), 1),
                "lat_p50_ms": round(1000 * self.pct("latency_s", 0.5), 1),
                "lat_p90_ms": round(1000 * self.pct("latency_s", 0.9), 1),
                "cpu_ms_per_tok": round(self.cpu_ms_per_token, 3), "errors": len(self.errors)}


def make_jobs(models: list[str], n: int, prompts: list[str] = PROMPTS) -> list[Job]:
    """n jobs cycling through models and prompts. Job i always has prompt i % len(prompts), so
    loads over different model lists send exactly the same prompts in the same order."""
    return [Job(models[i % len(models)], [{"role": "user", "content": prompts[i % len(prompts)]}])
            for i in range(n)]


async def run_load(base_url: str, jobs: list[Job], concurrency: int, max_tokens: int,
                   api_key: str = "none", timeout: float = 120.0) -> LoadResult:
    """Send `jobs` over `concurrency` streams; see the module docstring for what is measured."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout)
    queue = list(reversed(jobs))
    ttft: list[float] = []
    latency: list[float] = []
    errors: list[str] = []
    tokens = 0

    async def one(job: Job) -> None:
        nonlocal tokens
        t0 = time.perf_counter()
        first = None
        stream = await client.chat.completions.create(
            model=job.model, messages=job.messages, max_tokens=max_tokens, temperature=0,
            seed=0, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - t0
            if chunk.usage is not None:
                tokens += chunk.usage.completion_tokens
        latency.append(time.perf_counter() - t0)
        ttft.append(first if first is not None else latency[-1])

    async def worker() -> None:
        while queue:
            job = queue.pop()
            try:
                await one(job)
            except Exception as exc:  # counted and reported: a benchmark with errors is void
                errors.append(f"{job.model}: {type(exc).__name__}: {exc}"[:300])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    return LoadResult(len(jobs), tokens, wall, ttft, latency, errors)


def load(base_url: str, jobs: list[Job], concurrency: int, max_tokens: int, **kw) -> LoadResult:
    return asyncio.run(run_load(base_url, jobs, concurrency, max_tokens, **kw))


# -- reporting helpers -------------------------------------------------------------------------

def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for `machine()`."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def machine() -> str:
    load1, load5, _ = os.getloadavg()
    return (f"{os.cpu_count()} CPUs ({cpu_model()}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, load average {load1:.2f}/{load5:.2f} at start, "
            f"{dt.datetime.now().astimezone().isoformat(timespec='seconds')}")


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# -- the harness -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class EngineArgs:
    """The engine arguments both servers get (the same values on both sides)."""

    max_loras: int = 16
    max_lora_rank: int = 8
    max_cpu_loras: int = 16
    max_model_len: int = 512
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # vLLM's default for both usage contexts on CPU
    dtype: str = "float32"
    gpu_memory_utilization: float = 0.1
    kv_cache_gib: int = 1
    seed: int = 0
    multiprocessing: str = "1"  # VLLM_ENABLE_V1_MULTIPROCESSING: 1 is vLLM's (production) default


def base_env(args: EngineArgs) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                VLLM_CPU_KVCACHE_SPACE=str(args.kv_cache_gib), TOKENIZERS_PARALLELISM="false",
                VLLM_ENABLE_V1_MULTIPROCESSING=args.multiprocessing,
                VLLM_LOGGING_LEVEL="WARNING", PYTHONWARNINGS="ignore")


class Harness:
    """Work dir, subprocesses and their logs; a context manager that always cleans up."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc) -> None:
        for proc, _ in reversed(self.procs):
            stop(proc)

    def spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = self.workdir / f"{name}.log"
        proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=self.workdir)
        self.procs.append((proc, log))
        return proc

    def wait_ready(self, proc: subprocess.Popen, url: str, timeout: float = 300) -> float:
        """Seconds until GET url answers 200 (raises with the log tail if the server died)."""
        import httpx

        log = next(lg for p, lg in self.procs if p is proc)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"{log.name}: exited {proc.returncode}:\n"
                                   f"{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code == 200:
                    return time.time() - t0
            time.sleep(0.5)
        raise RuntimeError(f"{log.name}: not ready in {timeout:.0f}s:\n{log.read_text()[-3000:]}")

    # -- what the benchmarks need ----------------------------------------------------------
    def toy_model(self, base: Path | None) -> Path:
        if base is not None:
            return base.resolve()
        out = self.workdir / "toy-model"
        print(f"building the toy model in {out} (`loraplex toy-model`) ...", flush=True)
        subprocess.run([PY, "-m", "loraplex.adapters.cli", "toy-model", str(out)], check=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL)
        return out

    def registry(self, base: Path, base_name: str = "toy"):
        """A fresh registry (SQLite + local artifact dir) under <workdir>/home, base registered."""
        from loraplex.adapters.registry import Registry

        home = self.workdir / "home"
        home.mkdir(exist_ok=True)
        reg = Registry(f"sqlite:///{home / 'registry.db'}", str(home / "artifacts"))
        reg.register_base(base_name, base)
        return reg

    def start_loraplex(self, base: Path, args: EngineArgs, served_name: str = "toy",
                       poll_interval_s: float = 2.0, name: str = "loraplex",
                       env_extra: dict[str, str] | None = None, python: str = PY):
        port = free_port()
        home = self.workdir / "home"
        env = base_env(args) | dict(
            LORAPLEX_HOME=str(home), LORAPLEX_HOST="127.0.0.1", LORAPLEX_PORT=str(port),
            LORAPLEX_SERVED_MODEL_NAME=served_name, LORAPLEX_BASE_NAME=served_name,
            LORAPLEX_DTYPE=args.dtype, LORAPLEX_MAX_LORAS=str(args.max_loras),
            LORAPLEX_MAX_LORA_RANK=str(args.max_lora_rank),
            LORAPLEX_MAX_CPU_LORAS=str(args.max_cpu_loras),
            LORAPLEX_MAX_MODEL_LEN=str(args.max_model_len),
            LORAPLEX_MAX_NUM_SEQS=str(args.max_num_seqs), LORAPLEX_SEED=str(args.seed),
            LORAPLEX_GPU_MEMORY_UTILIZATION=str(args.gpu_memory_utilization),
            LORAPLEX_CPU_KVCACHE_SPACE_GIB=str(args.kv_cache_gib), LORAPLEX_ENFORCE_EAGER="true",
            LORAPLEX_POLL_INTERVAL_S=str(poll_interval_s), LORAPLEX_API_KEYS="",
        ) | (env_extra or {})
        proc = self.spawn(name, [python, "-m", "loraplex.adapters.cli", "serve", "--model", str(base),
                                 "--log-level", "warning"], env)
        return proc, f"http://127.0.0.1:{port}"

    def start_vllm(self, base: Path, args: EngineArgs, loras: dict[str, Path],
                   served_name: str = "toy", name: str = "vllm"):
        """vLLM's own OpenAI server (the module: the `vllm` CLI breaks under vllm-cpu)."""
        port = free_port()
        cmd = [PY, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
               "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
               "--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
               "--max-num-seqs", str(args.max_num_seqs),
               "--max-num-batched-tokens", str(args.max_num_batched_tokens),
               "--gpu-memory-utilization", str(args.gpu_memory_utilization),
               "--enforce-eager", "--enable-prefix-caching", "--seed", str(args.seed),
               "--enable-lora", "--max-loras", str(args.max_loras),
               "--max-lora-rank", str(args.max_lora_rank),
               "--max-cpu-loras", str(args.max_cpu_loras),
               "--uvicorn-log-level", "warning"]
        if loras:
            cmd += ["--lora-modules", *(f"{n}={p}" for n, p in loras.items())]
        proc = self.spawn(name, cmd, base_env(args))
        return proc, f"http://127.0.0.1:{port}"


def cpu_seconds(proc: subprocess.Popen) -> float:
    """User + system CPU seconds of a server's process tree so far (API, engine core, worker).

    CPU time per output token barely moves when other jobs share the machine, unlike tokens/s,
    so it is the steadier measure of a server's own overhead on a busy 2-core box.
    """
    import psutil

    total = 0.0
    try:
        root = psutil.Process(proc.pid)
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
    except psutil.Error:
        pass
    return total


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def make_adapters(base: Path, out: Path, n: int, rank: int = 8, seed: int = 0,
                  ranks: list[int] | None = None) -> dict[str, Path]:
    """n PEFT LoRAs (rank `rank`, all linear layers) with random non-zero B, in one process.

    Serving cost does not depend on the values, only on the shapes; random B makes every
    adapter a different model (a default-initialized LoRA has B = 0 and equals the base).
    `ranks` (one per adapter, e.g. [8, 16, 8, ...]) mixes ranks; without it every adapter has
    `rank` and they are made exactly as before.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ranks = list(ranks) if ranks is not None else [rank] * n
    if len(ranks) != n:
        raise ValueError(f"{len(ranks)} ranks for {n} adapters")
    names = {f"a{i:02d}": out / f"a{i:02d}" for i in range(n)}
    if all((p / "adapter_config.json").exists() for p in names.values()):
        return names
    models = {}  # one PEFT model per rank, made when first needed

    def peft_model(r: int):
        if r not in models:
            base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            models[r] = get_peft_model(base_model, LoraConfig(
                r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear"))
        return models[r]

    gen = torch.Generator().manual_seed(seed)
    for (_, path), r in zip(names.items(), ranks):
        model = peft_model(r)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        model.save_pretrained(path)
    return names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the server's /v1 base URL")
    p.add_argument("--model", action="append", required=True, help="repeat to mix models")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--api-key", default="none")
    a = p.parse_args()
    res = load(a.url, make_jobs(a.model, a.requests), a.concurrency, a.max_tokens,
               api_key=a.api_key)
    print(json.dumps(res.summary()))
    for e in res.errors[:5]:
        print("error:", e)


if __name__ == "__main__":
    main()
