"""Soak: many requests over many adapters through a real `loraplex serve`, with cancellations and
invalid requests mixed in, watching for failures, memory growth and leaked in-flight requests.

    .venv/bin/python benchmarks/soak.py [--base DIR] [--requests 2000] [--concurrency 64] \
        [--adapters 32] [--max-tokens 8] [--max-seconds 900]

Setup: `loadgen.make_adapters` writes `--adapters` PEFT LoRAs with different random weights
(rank 8, all linear layers), they are pushed to a fresh registry (a00 .. a31), and one
`loraplex serve` starts on loopback with the benchmarks' engine arguments (`EngineArgs`:
max_loras 16, max_cpu_loras 16, so with 32 adapters the engine's slots and host cache churn).

Load: `--requests` jobs from a seeded random plan, sent over `--concurrency` streams through the
official `openai` AsyncOpenAI client (no retries). Each job names the base or one adapter
(uniformly) and is one of:
  - ok (85%): chat or completions, streamed or not (a quarter each), `max_tokens` tokens with
    `ignore_eos`; must answer 200 with a finish_reason (a stream: and end with `data: [DONE]`);
  - cancelled (10%): a stream closed by the client after its first one or two chunks;
  - invalid (5%): temperature 9, an empty stop string, an unknown adapter, a message with role
    "robot", or max_tokens over the context (streamed or not); must be refused with a 4xx.
Anything else is unexpected: a 5xx, a transport error or timeout, a stream that ends without
`[DONE]` (checked on the raw bytes) or with an error event, a valid request refused, an invalid
one answered.

Measured: requests by outcome; the server's RSS (the whole process tree: API server, engine
core, workers) before the load and after every 100 requests; RSS growth from the first 500
requests to the last 500 (the highest sample in each window; with fewer than 1000 requests the
windows are the two halves); `loraplex_requests_in_flight` from /metrics after the load (given up
to 10 s to settle); requests/s and p50/p99 latency of the ok requests.

Pass (exit 0): no unexpected outcome, RSS growth < 5%, in-flight 0 at the end, and the whole
plan sent within `--max-seconds` (the wall-clock cap: no new request starts after it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402
from loadgen import PROMPTS, EngineArgs, Harness, table  # noqa: E402

IN_FLIGHT_SETTLE_S = 10.0
RSS_EVERY = 100
RSS_LIMIT_PCT = 5.0
INVALID_KINDS = ["temperature", "empty_stop", "unknown_adapter", "robot_role", "over_context"]


@dataclass
class Job:
    i: int
    kind: str  # ok | cancel | invalid
    api: str  # chat | completions
    stream: bool
    model: str
    invalid: str | None = None
    cancel_after: int = 1
    temperature: float = 0.0
    prompt: str = ""

    def describe(self, max_tokens: int, max_model_len: int) -> dict:
        """The request body as sent (for the report of an unexpected outcome)."""
        body = self.kwargs(max_tokens, max_model_len)
        return {"i": self.i, "endpoint": f"/v1/{'chat/completions' if self.api == 'chat' else 'completions'}",
                "kind": self.kind, "invalid": self.invalid, "body": body}

    def kwargs(self, max_tokens: int, max_model_len: int) -> dict:
        kw: dict = {"model": self.model, "max_tokens": max_tokens,
                    "temperature": self.temperature, "seed": self.i, "stream": self.stream}
        extra: dict = {"ignore_eos": True}
        if self.api == "chat":
            kw["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            kw["prompt"] = self.prompt
        if self.stream:
            kw["stream_options"] = {"include_usage": True}
        if self.invalid == "temperature":
            kw["temperature"] = 9
        elif self.invalid == "empty_stop":
            kw["stop"] = ""
        elif self.invalid == "unknown_adapter":
            kw["model"] = "no-such-adapter"
        elif self.invalid == "robot_role":
            kw["messages"] = [{"role": "robot", "content": self.prompt}]  # chat only (plan)
        elif self.invalid == "over_context":
            kw["max_tokens"] = max_model_len + 1000
        kw["extra_body"] = extra
        return kw


def make_plan(n: int, models: list[str], seed: int) -> list[Job]:
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        r = rng.random()
        kind = "invalid" if r < 0.05 else "cancel" if r < 0.15 else "ok"
        api = rng.choice(["chat", "completions"])
        stream = True if kind == "cancel" else rng.random() < 0.5
        job = Job(i, kind, api, stream, rng.choice(models),
                  temperature=rng.choice([0.0, 0.0, 0.7, 1.0]), prompt=rng.choice(PROMPTS))
        if kind == "invalid":
            job.invalid = INVALID_KINDS[i % len(INVALID_KINDS)]
            if job.invalid == "robot_role":
                job.api = "chat"
        if kind == "cancel":
            job.cancel_after = rng.choice([1, 2])
        jobs.append(job)
    return jobs


# -- raw-stream check: did the body carry `data: [DONE]`? ----------------------------------------

def scanning_client(timeout: float, seen_done: dict[str, bool], keepalive_expiry: float):
    """An httpx client for AsyncOpenAI whose responses note whether `[DONE]` went by."""
    import httpx

    class Scan(httpx.AsyncByteStream):
        def __init__(self, inner, key: str):
            self.inner, self.key = inner, key

        async def __aiter__(self):
            tail = b""
            async for chunk in self.inner:
                if b"[DONE]" in tail + chunk:
                    seen_done[self.key] = True
                tail = (tail + chunk)[-8:]
                yield chunk

        async def aclose(self) -> None:
            await self.inner.aclose()

    class ScanTransport(httpx.AsyncHTTPTransport):
        async def handle_async_request(self, request):
            resp = await super().handle_async_request(request)
            key = request.headers.get("x-soak-id")
            if key is not None:
                resp.stream = Scan(resp.stream, key)
            return resp

    limits = httpx.Limits(max_connections=256, max_keepalive_connections=128,
                          keepalive_expiry=keepalive_expiry)
    return httpx.AsyncClient(transport=ScanTransport(limits=limits), trust_env=False,
                             timeout=httpx.Timeout(timeout, connect=10.0))


# -- the load ---------------------------------------------------------------------------------

@dataclass
class Outcome:
    job: Job
    result: str  # ok | expected_4xx | cancelled | unexpected
    latency_s: float
    tokens: int = 0
    status: int | None = None
    detail: str = ""


@dataclass
class Soak:
    outcomes: list[Outcome] = field(default_factory=list)
    rss: list[tuple[int, int]] = field(default_factory=list)  # (requests done, bytes)
    per_process: dict = field(default_factory=dict)  # pid -> [name, first rss, last rss]
    wall_s: float = 0.0
    not_sent: int = 0


def tree_rss(pid: int, per: dict | None = None) -> int:
    """RSS bytes of a process and all its descendants; `per` collects, for each process,
    its name and its first and latest RSS."""
    import psutil

    total = 0
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                rss = p.memory_info().rss
                total += rss
                if per is not None:
                    per.setdefault(p.pid, [p.name(), rss, rss])[2] = rss
    return total


async def one(client, job: Job, a, max_model_len: int, seen_done: dict[str, bool]) -> Outcome:
    import openai

    key = str(job.i)
    kw = job.kwargs(a.max_tokens, max_model_len)
    kw["extra_headers"] = {"x-soak-id": key}
    create = client.chat.completions.create if job.api == "chat" else client.completions.create
    t0 = time.perf_counter()
    tokens, finish = 0, None
    try:
        resp = await create(**kw)
        if job.stream:
            chunks = 0
            async for chunk in resp:
                chunks += 1
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
                for c in chunk.choices:
                    finish = c.finish_reason or finish
                if job.kind == "cancel" and chunks >= job.cancel_after:
                    await resp.close()
                    return Outcome(job, "cancelled", time.perf_counter() - t0, status=200)
            lat = time.perf_counter() - t0
            if job.kind == "cancel":
                return Outcome(job, "unexpected", lat, tokens, 200,
                               f"stream ended after {chunks} chunks, before the cancel point")
            if not seen_done.get(key):
                return Outcome(job, "unexpected", lat, tokens, 200, "stream ended without [DONE]")
        else:
            lat = time.perf_counter() - t0
            tokens = resp.usage.completion_tokens if resp.usage else 0
            finish = resp.choices[0].finish_reason if resp.choices else None
        if job.kind == "invalid":
            return Outcome(job, "unexpected", lat, tokens, 200, "invalid request was answered")
        if finish is None:
            return Outcome(job, "unexpected", lat, tokens, 200, "no finish_reason")
        return Outcome(job, "ok", lat, tokens, 200)
    except openai.APIStatusError as exc:
        lat = time.perf_counter() - t0
        st = exc.status_code
        if job.kind == "invalid" and 400 <= st < 500:
            return Outcome(job, "expected_4xx", lat, status=st, detail=str(exc)[:200])
        return Outcome(job, "unexpected", lat, status=st, detail=f"HTTP {st}: {str(exc)[:400]}")
    except openai.APIError as exc:  # an error event mid-stream, a transport error, a timeout
        lat = time.perf_counter() - t0
        cause, chain = exc.__cause__ or exc.__context__, []
        while cause is not None and len(chain) < 4:
            chain.append(f"{type(cause).__name__}: {str(cause)[:200]}")
            cause = cause.__cause__ or cause.__context__
        return Outcome(job, "unexpected", lat, detail=" <- ".join(
            [f"{type(exc).__name__}: {str(exc)[:200]}", *chain]))


async def run_soak(url: str, jobs: list[Job], a, max_model_len: int, server_pid: int) -> Soak:
    from openai import AsyncOpenAI

    seen_done: dict[str, bool] = {}
    http = scanning_client(a.request_timeout, seen_done, a.keepalive_expiry)
    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                         http_client=http)
    soak = Soak()
    soak.rss.append((0, tree_rss(server_pid, soak.per_process)))
    queue = list(reversed(jobs))
    t0 = time.perf_counter()
    deadline = t0 + a.max_seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while queue and time.perf_counter() < deadline:
            job = queue.pop()
            try:
                out = await one(client, job, a, max_model_len, seen_done)
            except Exception as exc:  # anything the client did not map: still an outcome
                out = Outcome(job, "unexpected", float("nan"),
                              detail=f"{type(exc).__name__}: {str(exc)[:400]}")
            seen_done.pop(str(job.i), None)
            soak.outcomes.append(out)
            done += 1
            if done % RSS_EVERY == 0:
                soak.rss.append((done, tree_rss(server_pid, soak.per_process)))
            if done % 250 == 0:
                n_bad = sum(o.result == "unexpected" for o in soak.outcomes)
                print(f"  {done}/{len(jobs)} done, {time.perf_counter() - t0:.0f}s, "
                      f"unexpected {n_bad}, rss {soak.rss[-1][1] / 2**20:.0f} MiB", flush=True)

    await asyncio.gather(*(worker() for _ in range(a.concurrency)))
    soak.wall_s = time.perf_counter() - t0
    soak.not_sent = len(queue)
    if done % RSS_EVERY:
        soak.rss.append((done, tree_rss(server_pid, soak.per_process)))
    await client.close()
    return soak


def in_flight(url: str) -> float | None:
    import httpx

    text = httpx.get(url + "/metrics", timeout=10, trust_env=False).text
    for line in text.splitlines():
        if line.startswith("loraplex_requests_in_flight "):
            return float(line.split()[1])
    return None


def settle_in_flight(url: str) -> tuple[float | None, float]:
    t0 = time.time()
    while True:
        v = in_flight(url)
        if v == 0 or time.time() - t0 > IN_FLIGHT_SETTLE_S:
            return v, time.time() - t0
        time.sleep(0.5)


def rss_growth(rss: list[tuple[int, int]], n: int) -> tuple[float, int, int, int]:
    """(growth %, window size, first-window peak, last-window peak)."""
    w = min(500, n // 2) if n >= 2 else 1
    first = [b for k, b in rss if 0 < k <= w] or [rss[0][1]]
    last = [b for k, b in rss if k >= n - w and k > 0] or [rss[-1][1]]
    a, b = max(first), max(last)
    return 100 * (b - a) / a, w, a, b


def pct(xs: list[float], q: float) -> float:
    xs = sorted(x for x in xs if x == x)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, help="base model dir (default: build the toy model)")
    p.add_argument("--workdir", type=Path, help="keep files here (default: a temp dir, removed "
                   "unless the soak fails)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--max-seconds", type=float, default=900, help="wall-clock cap of the load")
    p.add_argument("--request-timeout", type=float, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keepalive-expiry", type=float, default=2.0,
                   help="seconds the client keeps an idle connection (below the server's 5 s "
                   "keep-alive; httpx's default, 5, races it: see docs/soak.md)")
    p.add_argument("--max-loras", type=int, default=EngineArgs.max_loras)
    p.add_argument("--max-cpu-loras", type=int, default=EngineArgs.max_cpu_loras)
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args()

    machine = loadgen.machine()
    cmd = "benchmarks/soak.py " + " ".join(sys.argv[1:])
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    args = EngineArgs(max_loras=a.max_loras, max_cpu_loras=a.max_cpu_loras)
    t_start = time.time()
    with Harness(workdir) as h:
        base = h.toy_model(a.base)
        t = time.time()
        paths = loadgen.make_adapters(base, workdir / "adapters", a.adapters, seed=a.seed)
        reg = h.registry(base)
        for name, path in paths.items():
            reg.push(path, name, base="toy")
        print(f"{len(paths)} adapters made and registered in {time.time() - t:.0f}s",
              flush=True)
        proc, url = h.start_loraplex(base, args)
        print(f"loraplex ready in {h.wait_ready(proc, url + '/ready'):.0f}s "
              f"(pid {proc.pid}, log {workdir / 'loraplex.log'})", flush=True)
        jobs = make_plan(a.requests, ["toy", *paths], a.seed)
        print(f"sending {len(jobs)} requests at {a.concurrency} concurrent ...", flush=True)
        soak = asyncio.run(run_soak(url, jobs, a, args.max_model_len, proc.pid))
        flight, settle_s = settle_in_flight(url)
        server_alive = proc.poll() is None

    outs = soak.outcomes
    n = len(outs)
    by = {k: sum(o.result == k for o in outs) for k in ("ok", "expected_4xx", "cancelled",
                                                       "unexpected")}
    growth, w, rss_a, rss_b = rss_growth(soak.rss, n)
    ok = [o for o in outs if o.result == "ok"]
    lat = [o.latency_s for o in ok]
    tokens = sum(o.tokens for o in ok)
    unexpected = [o for o in outs if o.result == "unexpected"]

    checks = {
        "unexpected == 0": by["unexpected"] == 0,
        f"RSS growth < {RSS_LIMIT_PCT:g}%": growth < RSS_LIMIT_PCT,
        "in-flight == 0 at the end": flight == 0,
        "all requests sent within --max-seconds": soak.not_sent == 0,
        "server still running": server_alive,
    }
    failed = not all(checks.values())

    print(f"\nCommand: `.venv/bin/python {cmd}`")
    print(f"Machine: {machine}")
    print(f"Date: {dt.date.today().isoformat()}; whole run {time.time() - t_start:.0f}s, "
          f"load {soak.wall_s:.1f}s\n")

    rows = []
    for label, sel in [
        ("chat, not streamed", lambda o: o.job.kind == "ok" and o.job.api == "chat" and not o.job.stream),
        ("chat, streamed", lambda o: o.job.kind == "ok" and o.job.api == "chat" and o.job.stream),
        ("completions, not streamed", lambda o: o.job.kind == "ok" and o.job.api == "completions" and not o.job.stream),
        ("completions, streamed", lambda o: o.job.kind == "ok" and o.job.api == "completions" and o.job.stream),
        ("cancelled mid-stream", lambda o: o.job.kind == "cancel"),
        ("invalid", lambda o: o.job.kind == "invalid"),
    ]:
        group = [o for o in outs if sel(o)]
        good = [o for o in group if o.result != "unexpected"]
        gl = [o.latency_s for o in group if o.result == "ok"]
        rows.append([label, len(group), len(good), len(group) - len(good),
                     f"{1000 * pct(gl, 0.5):.0f}" if gl else "", f"{1000 * pct(gl, 0.99):.0f}" if gl else ""])
    print(table(["request kind", "sent", "as expected", "unexpected", "p50 ms", "p99 ms"], rows))

    status_4xx: dict[str, dict[int, int]] = {}
    for o in outs:
        if o.job.kind == "invalid":
            status_4xx.setdefault(o.job.invalid, {}).setdefault(o.status, 0)
            status_4xx[o.job.invalid][o.status] += 1
    print("\nInvalid requests by kind -> HTTP status:",
          "; ".join(f"{k}: {v}" for k, v in sorted(status_4xx.items())))

    print()
    print(table(["measure", "value", "criterion", "met"], [
        ["requests (ok / expected 4xx / cancelled / unexpected)",
         f"{n} ({by['ok']} / {by['expected_4xx']} / {by['cancelled']} / {by['unexpected']})",
         "0 unexpected", "yes" if checks["unexpected == 0"] else "**no**"],
        ["server RSS (process tree), before load -> end",
         f"{soak.rss[0][1] / 2**20:.0f} -> {soak.rss[-1][1] / 2**20:.0f} MiB", "", ""],
        [f"RSS growth, peak of first {w} -> peak of last {w} requests",
         f"{rss_a / 2**20:.0f} -> {rss_b / 2**20:.0f} MiB ({growth:+.2f}%)",
         f"< {RSS_LIMIT_PCT:g}%", "yes" if checks[f"RSS growth < {RSS_LIMIT_PCT:g}%"] else "**no**"],
        ["`loraplex_requests_in_flight` after the load", f"{flight} (read after {settle_s:.1f}s)",
         "0", "yes" if checks["in-flight == 0 at the end"] else "**no**"],
        ["throughput (all requests / ok requests)",
         f"{n / soak.wall_s:.1f} / {len(ok) / soak.wall_s:.1f} req/s, "
         f"{tokens / soak.wall_s:.0f} output tok/s", "report", ""],
        ["latency of ok requests, p50 / p99", f"{1000 * pct(lat, 0.5):.0f} / {1000 * pct(lat, 0.99):.0f} ms",
         "report", ""],
        ["not sent (wall-clock cap)", soak.not_sent, "0", "yes" if soak.not_sent == 0 else "**no**"],
    ]))
    print("\nRSS samples (requests done: MiB):",
          ", ".join(f"{k}: {b / 2**20:.0f}" for k, b in soak.rss))
    print("RSS by process (first -> last sample, MiB):",
          "; ".join(f"{name} [{pid}]: {a0 / 2**20:.0f} -> {a1 / 2**20:.0f}"
                    for pid, (name, a0, a1) in soak.per_process.items()))

    if unexpected:
        print(f"\n{len(unexpected)} unexpected outcomes (first 10; all in "
              f"{workdir / 'unexpected.jsonl'}):")
        with (workdir / "unexpected.jsonl").open("w") as f:
            for o in unexpected:
                f.write(json.dumps({**o.job.describe(a.max_tokens, args.max_model_len),
                                    "status": o.status, "detail": o.detail}) + "\n")
        for o in unexpected[:10]:
            print(" ", json.dumps(o.job.describe(a.max_tokens, args.max_model_len)), "->",
                  o.status, o.detail)

    summary = {"requests": n, **by, "rss_mib": [[k, round(b / 2**20, 1)] for k, b in soak.rss],
               "rss_growth_pct": round(growth, 3),
               "rss_by_process_mib": {f"{v[0]} [{k}]": [round(v[1] / 2**20, 1), round(v[2] / 2**20, 1)]
                                      for k, v in soak.per_process.items()}, "in_flight_end": flight,
               "wall_s": round(soak.wall_s, 2), "req_s": round(n / soak.wall_s, 2),
               "ok_p50_ms": round(1000 * pct(lat, 0.5), 1), "ok_p99_ms": round(1000 * pct(lat, 0.99), 1),
               "not_sent": soak.not_sent, "checks": checks, "machine": machine, "command": cmd}
    if a.json:
        a.json.write_text(json.dumps(summary, indent=1))
    print("\nresult:", "PASS" if not failed else
          "FAIL (" + ", ".join(k for k, v in checks.items() if not v) + ")")
    if failed:
        print(f"work dir kept: {workdir}")
    elif a.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
