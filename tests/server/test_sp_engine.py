"""A SentencePiece-layout model served by vLLM's own OpenAI server and by `loraplex serve`.

The tiny model (tests/fixtures/tokenizers.py, `build_tiny_model`) has the legacy Llama-2
tokenizer.json under `LlamaTokenizer` with `legacy: false`, as Llama-2-7b-chat-hf ships it:
transformers 5 rebuilds its pipeline (Metaspace "first" instead of the file's Prepend
normalizer, so no "▁" after `<s>`), and vLLM tokenizes with transformers. Its chat template is
the Llama-2 one (`[INST]` as text, bos per turn, system folded into the first user turn).

Both servers run the same directory with the same engine settings; for each conversation:
- vLLM's `/tokenize` with `messages` (its chat-template path) gives the ids of loraplex's
  `/v1/render`, and both are transformers' `apply_chat_template` ids;
- a greedy chat completion (temperature 0, max_tokens 8) gives the same text and the same
  `usage.prompt_tokens` on both.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.fixtures.tokenizers import build_tiny_model, fixture_digest, template
from tests.services import free_port, server_env, stop_server, wait_ready

pytestmark = pytest.mark.engine

MECHANIC = "sp_legacy_llama_nonlegacy"
MAX_MODEL_LEN = 512
NAME = "tiny"

CONVERSATIONS = [
    [{"role": "user", "content": "Name a fruit."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "  Name a color. \n"}],
    [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"},
     {"role": "user", "content": "\nAnd 4 plus 4?"}],
    [{"role": "user", "content": "Où est le café ? 你好 👍🏽"}],
]


@pytest.fixture(scope="module")
def tiny_model(request: pytest.FixtureRequest) -> Path:
    from filelock import FileLock

    root = Path(request.config.cache.mkdir("sp-engine-model"))
    out = root / f"{MECHANIC}-{fixture_digest()}"
    with FileLock(str(root / "build.lock")):
        if not (out / "generation_config.json").exists():
            tmp = root / (out.name + ".partial")
            build_tiny_model(tmp, MECHANIC, chat_template=template("llama2"),
                             max_position_embeddings=2 * MAX_MODEL_LEN)
            tmp.rename(out)
    return out


@pytest.fixture(scope="module")
def servers(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """{"vllm": url, "loraplex": url}: both started at once, stopped at the end."""
    home = tmp_path_factory.mktemp("sp-engine")
    vport, lport = free_port(), free_port()
    vlog, llog = home / "vllm.log", home / "loraplex.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               TOKENIZERS_PARALLELISM="false")
    vllm = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model),
         "--served-model-name", NAME, "--host", "127.0.0.1", "--port", str(vport),
         "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
         "--gpu-memory-utilization", "0.1", "--enforce-eager", "--seed", "0",
         "--uvicorn-log-level", "warning"],
        env=env, stdout=vlog.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    lenv = server_env(home, lport, LORAPLEX_SERVED_MODEL_NAME=NAME, LORAPLEX_BASE_NAME=NAME,
                      LORAPLEX_MAX_MODEL_LEN=str(MAX_MODEL_LEN), LORAPLEX_API_KEYS="")
    lora = subprocess.Popen(  # --max-model-len explicitly: the default is the server's to choose
        [sys.executable, "-m", "loraplex.adapters.cli", "serve", "--model", str(tiny_model),
         "--max-model-len", str(MAX_MODEL_LEN)],
        env=lenv, stdout=llog.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    procs = [vllm, lora]
    try:
        vurl, lurl = f"http://127.0.0.1:{vport}", f"http://127.0.0.1:{lport}"
        wait_ready(vllm, vurl, vlog, path="/health")
        wait_ready(lora, lurl, llog)
        yield {"vllm": vurl, "loraplex": lurl}
    finally:
        for p in procs:
            stop_server(p)


@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
def test_vllm_tokenize_is_loraplex_render(servers, tiny_model, k):
    from transformers import AutoTokenizer

    msgs = CONVERSATIONS[k]
    v = httpx.post(servers["vllm"] + "/tokenize", json={
        "model": NAME, "messages": msgs, "add_generation_prompt": True,
        "add_special_tokens": False}, timeout=60)
    assert v.status_code == 200, v.text
    r = httpx.post(servers["loraplex"] + "/v1/render", json={"model": NAME, "messages": msgs},
                   timeout=60)
    assert r.status_code == 200, r.text
    hf = AutoTokenizer.from_pretrained(tiny_model)
    expected = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True,
                                      return_dict=False)
    assert r.json()["prompt"] == hf.apply_chat_template(msgs, tokenize=False,
                                                        add_generation_prompt=True)
    assert r.json()["token_ids"] == expected
    assert v.json()["tokens"] == expected


@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
def test_greedy_chat_is_the_same_on_both(servers, k):
    from openai import OpenAI

    msgs = CONVERSATIONS[k]
    out = {}
    for side, url in servers.items():
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        c = client.chat.completions.create(model=NAME, messages=msgs, temperature=0, max_tokens=8)
        out[side] = (c.choices[0].message.content, c.usage.prompt_tokens, c.choices[0].finish_reason)
    assert out["loraplex"] == out["vllm"]
