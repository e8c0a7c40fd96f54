"""Every command in the README's "Using it" section runs as written on a fresh machine.

The section's bash block runs command by command (each through `bash -c`, exports carried to the
next), in an empty directory, then its python block runs against the server the bash block
started. "Fresh" here means: HOME is a new temp directory (so `~/.loraplex` from the README's
`export LORAPLEX_HOME=~/.loraplex` is under it), no `LORAPLEX_*` variable is inherited, and the
venv's `loraplex` is on PATH. What is kept from the test session: the offline hub and the
vLLM CPU settings tests/conftest.py sets (HF_HUB_OFFLINE, VLLM_CPU_KVCACHE_SPACE,
VLLM_ENABLE_V1_MULTIPROCESSING), and the cache directory (XDG_CACHE_HOME), so vLLM's compile
cache is reused between runs.

Substitutions, only these:
- `source .venv/bin/activate` is checked against this checkout's venv, whose bin is already on
  PATH (the block runs in an empty directory, not in the checkout);
- `./toy` is pre-populated with the session's cached toy model before `loraplex toy-model ./toy`
  runs (as written), so a `toy-model` that keeps a directory already holding the same toy is fast;
- the port: when the README's port (8000) is taken on this machine, the test substitutes a free
  one in the `loraplex serve` command and in the python block's base_url (and says so in the log);
- `my.jsonl`, which the README leaves to the reader, is written by the test (OpenAI messages).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.services import free_port, stop_server, wait_ready

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[2]


def using_it() -> tuple[list[str], str]:
    """(the bash block's commands, continuation lines joined; the python block)."""
    readme = (ROOT / "README.md").read_text()
    assert "\n## Using it\n" in readme, "the README has no '## Using it' section"
    section = readme.split("\n## Using it\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", section, re.S | re.M)
    bash = [body for lang, body in blocks if lang in ("bash", "sh", "shell")]
    python = [body for lang, body in blocks if lang == "python"]
    assert len(bash) == 1 and len(python) == 1, [lang for lang, _ in blocks]
    commands = [c.strip() for c in re.sub(r"\\\n", " ", bash[0]).splitlines()]
    return [c for c in commands if shlex.split(c, comments=True)], python[0]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def fresh_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env["XDG_CACHE_HOME"] = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    env["HOME"] = str(home)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def write_data(path: Path, task_prompts) -> None:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in task_prompts("upper", 32, seed=1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_python_block(code: str) -> object:
    """Run the block as written; return the value of its last expression (as a REPL shows it)."""
    tree = ast.parse(code, "README.md")
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    ns: dict = {"__name__": "__readme__"}
    exec(compile(tree, "README.md", "exec"), ns)
    return eval(compile(ast.Expression(last.value), "README.md", "eval"), ns) if last else None


def test_using_it_runs_as_written(tmp_path, toy_model_dir, task_prompts):
    commands, python = using_it()
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "home").mkdir()
    env = fresh_env(tmp_path / "home")
    write_data(work / "my.jsonl", task_prompts)
    server: subprocess.Popen | None = None
    log = tmp_path / "serve.log"
    times: list[tuple[str, float]] = []

    def report() -> str:
        return "; ".join(f"{c.split()[1] if c.startswith('loraplex') else c.split()[0]} "
                         f"{s:.0f}s" for c, s in times)

    try:
        for cmd in commands:
            argv = shlex.split(cmd, comments=True)
            t0 = time.monotonic()
            if argv[0] in ("source", ".") and argv[1:] == [".venv/bin/activate"]:
                # The checkout's venv: its bin is already first on PATH (fresh_env).
                assert (ROOT / ".venv/bin/activate").is_file()
            elif argv[0] == "export":
                r = subprocess.run(["bash", "-c", cmd + "\nenv -0"], cwd=work, env=env,
                                   capture_output=True, timeout=30)
                assert r.returncode == 0, (cmd, r.stderr.decode())
                env = dict(kv.split("=", 1) for kv in r.stdout.decode().split("\0") if "=" in kv)
            elif argv[:2] == ["loraplex", "serve"]:
                port = int(argv[argv.index("--port") + 1]) if "--port" in argv else 8000
                if not port_is_free(port):
                    new = free_port()
                    print(f"port {port} is taken here: serving on {new} instead", file=sys.stderr)
                    cmd = cmd.replace(f"--port {port}", f"--port {new}")
                    python = python.replace(f"127.0.0.1:{port}/", f"127.0.0.1:{new}/")
                    port = new
                server = subprocess.Popen(["bash", "-c", "exec " + cmd], cwd=work, env=env,
                                          stdout=log.open("w"), stderr=subprocess.STDOUT,
                                          start_new_session=True)
                wait_ready(server, f"http://127.0.0.1:{port}", log, timeout=300)
            else:
                if argv[:2] == ["loraplex", "toy-model"]:
                    shutil.copytree(toy_model_dir, work / argv[2])
                r = subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True,
                                   text=True, timeout=900)
                assert r.returncode == 0, f"{cmd}\n exited {r.returncode}:\n{r.stderr[-4000:]}"
            times.append((cmd, time.monotonic() - t0))

        assert server is not None, "the bash block starts no `loraplex serve`"
        t0 = time.monotonic()
        result = run_python_block(python)
        times.append(("python block", time.monotonic() - t0))
        # The README's call returns a chat completion from the adapter it names.
        assert isinstance(result.choices[0].message.content, str)
        assert result.choices[0].finish_reason in ("stop", "length")
        # LORAPLEX_HOME was honoured: the registry is where the README says.
        assert (Path(env["LORAPLEX_HOME"]) / "registry.db").is_file()
    finally:
        print("README 'Using it' timings:", report(), file=sys.stderr)
        if log.exists():  # shown by pytest only when the test fails
            print("--- loraplex serve log (tail) ---\n" + log.read_text()[-4000:], file=sys.stderr)
        if server is not None:
            stop_server(server)
