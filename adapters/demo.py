"""`loraplex demo`: the whole product on embedded defaults, offline.

toy base model -> train two adapters on bundled data with different chat templates (`words`:
Alpaca data, ChatML; `lists`: ShareGPT data, Llama-2 template) -> register both -> serve ->
ask the base and both adapters the same held-out questions through the official `openai`
client, printed side by side.

Each step runs the `loraplex` command itself in a subprocess, as a user would, so this module
(in the shared package, where the CLI lives) never imports the trainer or the server.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import resources
from pathlib import Path

from loraplex.adapters.errors import LoraplexError

ADAPTERS = {  # name: (bundled data, chat template, held-out file)
    "words": ("words.alpaca.jsonl", "chatml", "words.alpaca.heldout.jsonl"),
    "lists": ("lists.sharegpt.jsonl", "llama2", "lists.sharegpt.heldout.jsonl"),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="toy model -> train two adapters -> register -> serve -> query",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("demo-out"),
                   help="where the toy model, registry and adapters go (reused if present)")
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--max-steps", type=int, default=300, help="training steps per adapter")
    p.add_argument("--questions", type=int, default=6, help="held-out questions per adapter")
    p.set_defaults(func=run)


def _step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def _loraplex(*args: str, env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "loraplex.adapters.cli", *args]
    print("$ loraplex " + " ".join(args), flush=True)
    if subprocess.run(cmd, env=env).returncode != 0:
        raise LoraplexError(f"`loraplex {args[0]}` failed (see its output above)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _questions(file: str, n: int) -> list[tuple[str, str]]:
    """(user message, expected answer) from a bundled held-out file (Alpaca or ShareGPT rows)."""
    text = resources.files("loraplex.trainer").joinpath("data", file).read_text()
    out = []
    for line in text.splitlines()[: 4 * n : 4]:  # every 4th row: a mix of the tasks
        row = json.loads(line)
        if "instruction" in row:
            q = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
            out.append((q, row["output"]))
        else:  # ShareGPT: the first human turn and the reply to it (a system turn is skipped)
            turns = [t for t in row["conversations"] if t["from"] != "system"]
            out.append((turns[0]["value"], turns[1]["value"]))
    return out[:n]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise LoraplexError(f"the server exited with code {proc.returncode} (see above)")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise LoraplexError(f"the server was not ready within {timeout:.0f}s")


def run(args: argparse.Namespace) -> int:
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, LORAPLEX_HOME=str(work / "home"), HF_HUB_OFFLINE="1",
               VLLM_ENABLE_V1_MULTIPROCESSING=os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0"))
    base = work / "toy-model"

    _step("1. the toy base model (offline, deterministic)")
    if not (base / "config.json").exists():
        _loraplex("toy-model", str(base), env=env)
    else:
        print(f"reusing {base}")
    _loraplex("adapters", "base", "add", "toy", str(base), env=env)

    for name, (data, template, _) in ADAPTERS.items():
        _step(f"2. train `{name}` on {data} with the {template} chat template, and register it")
        # The toy base learns these closed-answer tasks in minutes at a LoRA-sized learning
        # rate (see docs/trainer.md); the trainer's general defaults are gentler.
        _loraplex("train", "--base", str(base), "--data", f"{_data_dir()}/{data}",
                  "--chat-template", template, "--output", str(work / "adapters" / name),
                  "--overwrite", "--register", name, "--alias", "prod", "--no-progress-bar",
                  "--max-steps", str(args.max_steps), "--lr", "1e-3", "--lora-r", "16",
                  "--lora-alpha", "32", "--batch-size", "16", env=env)

    _step("3. serve the base and both adapters (one engine, adapters hot-loaded)")
    port = args.port or _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "loraplex.adapters.cli", "serve", "--model", str(base),
         "--served-model-name", "toy", "--port", str(port), "--dtype", "float32",
         "--max-model-len", "1024", "--max-lora-rank", "16", "--gpu-memory-utilization", "0.1",
         "--cpu-kvcache-space-gib", "1", "--enforce-eager", "--log-level", "warning"],
        env=env, start_new_session=True)
    try:
        _wait_ready(url, server)
        _step("4. the same questions to the base and to each adapter (openai client, greedy)")
        _compare(url, args.questions)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
    print(f"\nDone. The registry is in {work / 'home'}; try `LORAPLEX_HOME={work / 'home'} "
          "loraplex adapters list`.")
    return 0


def _data_dir() -> str:
    return str(resources.files("loraplex.trainer").joinpath("data"))


def _compare(url: str, n: int) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="demo")
    models = ["toy", *ADAPTERS]
    score = {(task, m): 0 for task in ADAPTERS for m in models}
    asked = {task: 0 for task in ADAPTERS}
    for name, (_, template, heldout) in ADAPTERS.items():
        print(f"\n-- held-out questions of `{name}` (trained with {template})")
        for q, want in _questions(heldout, n):
            asked[name] += 1
            print(f"Q: {q!r}   expected: {want!r}")
            for m in models:
                r = client.chat.completions.create(
                    model=m, messages=[{"role": "user", "content": q}], max_tokens=24, temperature=0)
                got = (r.choices[0].message.content or "").strip()
                score[name, m] += got == want
                print(f"   {m:>6}: {got!r}{'  ✓' if got == want else ''}")
    print("\nexact matches on held-out questions (rows: question set, columns: model asked)")
    print(f"{'':>12}" + "".join(f"{m:>8}" for m in models))
    for task in ADAPTERS:
        print(f"{task + ' set':>12}" + "".join(f"{score[task, m]:>6}/{asked[task]}" for m in models))
