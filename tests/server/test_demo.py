"""`examples/demo.sh` (what `make demo` runs) end to end, with few training steps.

The full demo trains three adapters for hundreds of steps (3 minutes on a quiet 2-core machine
with the toy built, 21 under a load of 5); here the same script runs with STEPS=40 and
LISTS_STEPS=5 and the session's cached toy model (82 s quiet, under 5 minutes loaded), so every
command of it runs (train, register, serve, the side-by-side answers, distillation, eval,
promote) and the test checks that it ends with the eval table and the promotion decision, stores the figures
and stops its server. 40 steps are enough for `words` to answer in its format (an answer and
its stop token), so the distilled data is not all truncated rows that the filter would drop.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from loraplex.adapters.registry import Registry
from tests.services import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.engine
def test_demo_script_end_to_end(toy_model_dir: Path, tmp_path: Path):
    work = tmp_path / "demo"
    work.mkdir()
    (work / "toy-model").symlink_to(toy_model_dir)  # the script reuses a toy model it finds
    port = free_port()
    env = dict(os.environ, WORK=str(work), STEPS="40", LISTS_STEPS="5", PORT=str(port),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    # As a user runs it: the engine in its own process (tests/conftest.py keeps it in-process
    # for the other server tests, whose servers start often and serve little).
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    r = subprocess.run(["bash", str(ROOT / "examples" / "demo.sh")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    out = r.stdout
    assert r.returncode == 0, (out + r.stderr)[-6000:]

    # Every step ran, in order.
    steps = [line for line in out.splitlines() if line.startswith("=== ")]
    assert [s.split()[1] for s in steps if s.split()[1][0].isdigit()] == [
        "1.", "2.", "3.", "4.", "5.", "6.", "7.", "8."], steps
    # The side-by-side answers: each question asked of the base and both adapters.
    assert out.count("Q: ") == 5 and out.count("   lists  ") == 5
    # The eval table: base, words@1, words@2 on both sets.
    table = out[out.index("=== 7."):out.index("=== 8.")]
    header = next(line for line in table.splitlines() if line.startswith("FIGURE"))
    assert header.split() == ["FIGURE", "toy", "(base)", "words@1", "words@2"], header
    assert "heldout.exact_match" in table and "teacher.exact_match" in table
    # The promotion decision is the last thing the demo prints before its closing line.
    decision = out[out.index("=== 8."):]
    assert ("promoted: words:prod 1 -> 2" in decision) != ("rejected: words:prod stays at 1"
                                                             in decision), decision
    assert "heldout.exact_match" in decision and "teacher.exact_match" in decision
    # The filter dropped the two prompts copied from the held-out set.
    assert "eval_overlap" in r.stderr

    reg = Registry(f"sqlite:///{work / 'home' / 'registry.db'}", str(work / "home" / "artifacts"))
    try:
        assert sorted(v.version for v in reg.list("words")) == [1, 2]
        (decided,) = reg.promotions("words")
        assert decided.actor == "demo" and decided.candidate == 2
        prod = reg.resolve("words:prod").version
        assert prod == (2 if decided.outcome == "promoted" else 1)
        assert set(reg.show("words@2").metrics["evals"]) == {"heldout", "teacher"}
    finally:
        reg.close()
    # The trap stopped the server.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
