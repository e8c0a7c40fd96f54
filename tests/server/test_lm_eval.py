"""lm-evaluation-harness against an adapter: `loraplex serve` scores what vLLM's own server scores.

lm-eval's `local-completions` model (a /v1/completions client) runs two small custom tasks
(tests/fixtures/lm_eval/) against the `upper` test adapter:

- `loraplex_upper_gen`, generate_until: batches of token-id prompts, greedy, stop strings;
- `loraplex_upper_mc`, multiple_choice (log-likelihood): batches of token-id prompts with
  `echo: true, logprobs: 1, max_tokens: 1`, scored from the echoed prompt logprobs.

Each runs twice per server: with a local Hugging Face tokenizer (`tokenizer_backend=
huggingface`, the toy model's directory) and with the server's own (`tokenizer_backend=
remote`: GET /tokenizer_info, POST /tokenize at the server root). vLLM's server runs first
(module fixture: start, evaluate, stop), then `loraplex serve` with the same engine settings
and the same adapter under the same name, and the aggregate scores, every generated text and
every log-likelihood must agree.

vLLM's server runs with max_num_seqs=1: vLLM 0.32's CPU LoRA logits op indexes the batch's
per-*request* LoRA indices with per-*token* prompt rows when it computes prompt logprobs, so a
step with two or more requests that want prompt logprobs kills its engine (einsum "subscript b
has size N ... does not broadcast"; upstream vllm#16668, #51594). `loraplex serve` carries a
fix (`server/engine/core.py`, `_prompt_logprobs_safe`) and runs with its default batch, so the
batches of 8 prompts lm-eval sends are scored in one engine step: the same scores with and
without batching is what shows the fix exact.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.services import free_port, server_env, spawn_server, stop_server, wait_ready

pytestmark = pytest.mark.engine

TASKS_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "lm_eval"
GEN, MC = "loraplex_upper_gen", "loraplex_upper_mc"
ADAPTER = "upper"
BATCH_SIZE = 8  # prompts per /v1/completions request (a `prompt` list)
VLLM_MAX_NUM_SEQS = 1  # vLLM's own server only: see the module docstring
API_KEY = "test-key"  # server_env's; vLLM's server runs without keys and ignores the header
MODES = ("hf_tokenizer", "remote_tokenizer")

# The engine settings of server_env, given to vLLM's server as flags.
ENGINE_FLAGS = [
    "--dtype", "float32", "--max-model-len", "512", "--max-loras", "2", "--max-lora-rank", "8",
    "--max-cpu-loras", "8", "--gpu-memory-utilization", "0.1", "--enforce-eager",
    "--enable-prefix-caching", "--seed", "0", "--max-num-seqs", str(VLLM_MAX_NUM_SEQS),
]


@contextmanager
def recorded_requests():
    """Every HTTP request lm-eval makes through `requests` (its sync path), as
    {"method", "path", "json"}."""
    import requests

    seen: list[dict] = []
    original = requests.Session.request

    def request(self, method, url, *args, **kwargs):
        seen.append({"method": method.upper(), "path": "/" + url.split("/", 3)[3],
                     "json": kwargs.get("json")})
        return original(self, method, url, *args, **kwargs)

    requests.Session.request = request
    try:
        yield seen
    finally:
        requests.Session.request = original


def run_lm_eval(url: str, tokenizer_dir: Path, mode: str) -> dict:
    """Both tasks against `url`; lm-eval's results dict plus the requests it sent."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_args: dict = dict(
        model=ADAPTER, base_url=f"{url}/v1/completions", batch_size=BATCH_SIZE,
        num_concurrent=1, max_retries=1, max_length=512, timeout=120,
        header={"Authorization": f"Bearer {API_KEY}"},
    )
    if mode == "hf_tokenizer":
        model_args.update(tokenizer_backend="huggingface", tokenizer=str(tokenizer_dir))
    else:  # the server's /tokenizer_info and /tokenize (its auth is a separate argument)
        model_args.update(tokenizer_backend="remote", auth_token=API_KEY)
    with recorded_requests() as sent:
        out = lm_eval.simple_evaluate(
            model="local-completions", model_args=model_args, tasks=[GEN, MC],
            task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
            log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
            torch_random_seed=0, fewshot_random_seed=0,
        )
    out["requests"] = sent
    return out


def scores(out: dict) -> dict[str, dict[str, float]]:
    keep = {GEN: ("exact_match,none", "shouted,none", "word_recall,none"),
            MC: ("acc,none", "acc_norm,none")}
    return {t: {m: out["results"][t][m] for m in ms} for t, ms in keep.items()}


def generations(out: dict) -> dict[int, str]:
    return {s["doc_id"]: s["filtered_resps"][0] for s in out["samples"][GEN]}


def loglikelihoods(out: dict) -> dict[int, list[tuple[float, bool]]]:
    return {s["doc_id"]: [(float(ll), bool(g)) for ll, g in s["filtered_resps"]]
            for s in out["samples"][MC]}


def describe(out: dict) -> str:
    return json.dumps({"scores": scores(out), "generations": generations(out)}, indent=1)


# -- servers -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vllm_reference(toy_model_dir, test_loras, tmp_path_factory) -> dict[str, dict]:
    """lm-eval's results against vLLM's own OpenAI server, per mode (the server is stopped
    before loraplex starts: two engines would share the two cores)."""
    pytest.importorskip("lm_eval")
    work = tmp_path_factory.mktemp("lm-eval-vllm")
    port, log = free_port(), work / "vllm.log"
    env = server_env(work, port)  # the same process environment as loraplex's
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(toy_model_dir), "--served-model-name", "toy",
           "--host", "127.0.0.1", "--port", str(port), *ENGINE_FLAGS,
           "--enable-lora", "--lora-modules", f"{ADAPTER}={test_loras[ADAPTER]}",
           "--enable-tokenizer-info-endpoint", "--uvicorn-log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=work)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, url, log, timeout=300, path="/health")
        results = {}
        for mode in MODES:
            try:
                results[mode] = run_lm_eval(url, toy_model_dir, mode)
            except Exception as exc:
                raise RuntimeError(f"lm-eval against vLLM's server ({mode}) failed: {exc!r}\n"
                                   f"{log.read_text()[-4000:]}") from exc
    finally:
        stop_server(proc)
    return results


@pytest.fixture(scope="module")
def loraplex_url(vllm_reference, toy_model_dir, test_loras, tmp_path_factory):
    """`loraplex serve` with server_env's engine settings (its default batch) and the same
    adapter pushed under the same name. Its own server, not the session's `served`: a request
    that kills the engine fails this module only."""
    from loraplex.adapters.registry import Registry

    home = tmp_path_factory.mktemp("lm-eval-loraplex")
    registry = Registry(f"sqlite:///{home / 'registry.db'}", str(home / "artifacts"))
    registry.register_base("toy", toy_model_dir)
    registry.push(test_loras[ADAPTER], ADAPTER, base="toy")
    registry.close()
    port, log = free_port(), home / "server.log"
    env = server_env(home, port)
    proc = spawn_server(toy_model_dir, env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log, timeout=300)
        yield url, log
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def loraplex_results(loraplex_url, toy_model_dir) -> dict[str, dict]:
    url, log = loraplex_url
    results: dict[str, dict] = {}
    for mode in MODES:
        t0 = time.monotonic()
        try:
            results[mode] = run_lm_eval(url, toy_model_dir, mode)
        except Exception as exc:  # kept, so each mode's test reports its own failure
            results[mode] = {"error": f"{exc!r}\n--- loraplex log ---\n{log.read_text()[-4000:]}"}
        results[mode]["seconds"] = time.monotonic() - t0
    return results


# -- tests ---------------------------------------------------------------------------------------

def assert_same(ours: dict, ref: dict) -> None:
    """Equal scores and generated texts; log-likelihoods equal to 1e-4 (batched on our side,
    one request per step on vLLM's: float32 rounding may differ in the last bits)."""
    assert "error" not in ours, ours.get("error")
    assert scores(ours) == scores(ref), f"ours:\n{describe(ours)}\nreference (vLLM):\n{describe(ref)}"
    assert generations(ours) == generations(ref)
    mine, theirs = loglikelihoods(ours), loglikelihoods(ref)
    assert mine.keys() == theirs.keys()
    for doc_id, lls in theirs.items():
        assert [g for _, g in mine[doc_id]] == [g for _, g in lls], doc_id
        assert [ll for ll, _ in mine[doc_id]] == pytest.approx([ll for ll, _ in lls], abs=1e-4), doc_id


def test_vllm_reference_is_meaningful(vllm_reference):
    """The reference run itself: every doc scored, the adapter applied (it shouts), the
    log-likelihood task decided by the logprobs (not all choices tied), and both tokenizer
    modes agree with each other."""
    hf = vllm_reference["hf_tokenizer"]
    s = scores(hf)
    assert len(hf["samples"][GEN]) == 12 and len(hf["samples"][MC]) == 12
    assert s[GEN]["shouted,none"] >= 0.75, describe(hf)
    assert s[GEN]["word_recall,none"] > 0.0, describe(hf)
    assert s[MC]["acc,none"] > 0.0, describe(hf)
    for lls in loglikelihoods(hf).values():
        assert len({ll for ll, _ in lls}) == 4 and all(math.isfinite(ll) and ll < 0 for ll, _ in lls)
    remote = vllm_reference["remote_tokenizer"]
    assert_same(remote, hf)


def test_lm_eval_scores_match_vllm(loraplex_results, vllm_reference):
    """lm-eval with a local tokenizer: token-id prompt lists to /v1/completions only."""
    ours = loraplex_results["hf_tokenizer"]
    assert_same(ours, vllm_reference["hf_tokenizer"])
    # What lm-eval sent, so a change of client behaviour shows up here: prompt lists of
    # token ids; generation with max_tokens/stop/temperature 0; log-likelihood as
    # echo + logprobs=1 + max_tokens=1. Nothing but /v1/completions.
    sent = ours["requests"]
    assert {(r["method"], r["path"]) for r in sent} == {("POST", "/v1/completions")}
    gen = [r["json"] for r in sent if not r["json"].get("echo")]
    ll = [r["json"] for r in sent if r["json"].get("echo")]
    assert len(gen) == 2 and len(ll) == 6  # 12 prompts and 48 continuations, 8 a request
    for body in gen + ll:
        assert body["model"] == ADAPTER
        assert isinstance(body["prompt"], list) and len(body["prompt"]) > 1
        assert all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in body["prompt"])
    assert all(b["max_tokens"] == 16 and b["temperature"] == 0 and b["stop"] for b in gen)
    assert all(b["max_tokens"] == 1 and b["logprobs"] == 1 and b["temperature"] == 0 for b in ll)


def test_lm_eval_remote_tokenizer_matches_vllm(loraplex_results, vllm_reference):
    """lm-eval with the server's tokenizer: GET /tokenizer_info, POST /tokenize, then the same
    /v1/completions requests."""
    ours = loraplex_results["remote_tokenizer"]
    assert_same(ours, vllm_reference["remote_tokenizer"])
    paths = {(r["method"], r["path"]) for r in ours["requests"]}
    assert paths == {("GET", "/tokenizer_info"), ("POST", "/tokenize"), ("POST", "/v1/completions")}
