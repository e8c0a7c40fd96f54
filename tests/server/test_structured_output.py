"""`response_format` json_object / json_schema: loraplex against vLLM's own server (docs/structured_output.md).

The issue: with the toy model, a JSON response never closes within 40-60 tokens, `{` and then
a run of newlines. The finding pinned here:

- vLLM's own OpenAI server on the same engine gives the same output, token for token, so the
  constraint does reach the engine: the default JSON grammar (xgrammar, which vLLM's "auto"
  backend picks for these requests on CPU) allows any whitespace between JSON tokens, and the
  toy model, which never saw JSON, prefers whitespace to any key or `}` at every step.
- vLLM 0.32's whitespace-free grammar is an engine setting, `structured_outputs_config=
  {"backend": "xgrammar", "disable_any_whitespace": true}` (vLLM's server:
  `--structured-outputs-config '{...}'`; loraplex: `LORAPLEX_ENGINE_ARGS` / `--engine-arg`).
  With it the same requests close and parse, with no whitespace outside strings but one space
  after a comma between free-form items (xgrammar 0.2.8 writes its json_object grammar with
  ", "); the schema bounds its string (maxLength), as the toy model would fill a free-text
  string with prose to max_tokens.
- vLLM's server also accepts `"structured_outputs": {..., "disable_any_whitespace": true}` per
  request, but 0.32 ignores it (both grammar backends read only the engine setting): same
  output as without it.

Servers, one after another so engines do not share the two cores: vLLM's server with the
default grammar runs first (module fixture: start, record every answer, stop), then two
`loraplex serve` processes side by side, one with the default grammar and one with the
whitespace-free engine setting, the same one-step adapter pushed under the same name.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.services import free_port, server_env, spawn_server, stop_server, wait_ready

pytestmark = pytest.mark.engine

ADAPTER = "onestep"
MAX_TOKENS = 60
API_KEY = "test-key"  # server_env's; vLLM's server runs without keys and ignores the header
HEADERS = {"Authorization": f"Bearer {API_KEY}"}

# The engine settings of server_env, given to vLLM's server as flags.
ENGINE_FLAGS = [
    "--dtype", "float32", "--max-model-len", "512", "--max-loras", "2", "--max-lora-rank", "8",
    "--max-cpu-loras", "8", "--gpu-memory-utilization", "0.1", "--enforce-eager",
    "--enable-prefix-caching", "--seed", "0",
]
# vLLM 0.32's whitespace-free JSON grammar. The backend must be named: StructuredOutputsConfig
# refuses disable_any_whitespace with backend "auto" (only xgrammar and guidance support it).
COMPACT = {"backend": "xgrammar", "disable_any_whitespace": True}

# Bounded values: with an unbounded string the toy model writes prose into it up to max_tokens,
# whitespace or not (docs/structured_output.md).
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8},
                   "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"], "additionalProperties": False,
}


def body(model: str, response_format: dict | None = None, **extra) -> dict:
    b = {"model": model, "messages": [{"role": "user", "content": "Give me a JSON object."}],
         "temperature": 0, "max_tokens": MAX_TOKENS, "logprobs": True}
    if response_format is not None:
        b["response_format"] = response_format
    return b | extra


JSON_OBJECT = {"type": "json_object"}


def json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}


# The requests both servers answer with the default grammar, by case name.
CASES = {
    "json_object": body("toy", JSON_OBJECT),
    "json_object_adapter": body(ADAPTER, JSON_OBJECT),
    "json_schema": body("toy", json_schema(PERSON)),
}
# vLLM's per-request field: accepted by vLLM 0.32's server, but without effect.
VLLM_PER_REQUEST = body("toy", None, structured_outputs={"json_object": True,
                                                         "disable_any_whitespace": True})


def ask(url: str, payload: dict) -> dict:
    """The answer's text, tokens, finish reason and completion token count."""
    import httpx

    r = httpx.post(url + "/v1/chat/completions", json=payload, headers=HEADERS, timeout=180)
    assert r.status_code == 200, r.text
    d = r.json()
    choice = d["choices"][0]
    out = {
        "text": choice["message"]["content"],
        "tokens": [t["token"] for t in choice["logprobs"]["content"]],
        "finish_reason": choice["finish_reason"],
        "completion_tokens": d["usage"]["completion_tokens"],
    }
    return out


def outside_strings(text: str) -> str:
    """`text` without its JSON string literals (each left as `""`)."""
    out, in_string, escaped = [], False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
                out.append(ch)
        else:
            out.append(ch)
            in_string = ch == '"'
    return "".join(out)


def parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


# -- servers -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vllm_answers(toy_model_dir, one_step_lora, tmp_path_factory) -> dict[str, dict]:
    """vLLM's own server (default structured-output settings): every case's answer, and the
    per-request `disable_any_whitespace` one; the server is stopped before loraplex starts."""
    work = tmp_path_factory.mktemp("so-vllm")
    port, log = free_port(), work / "vllm.log"
    env = server_env(work, port)  # the same process environment as loraplex's
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(toy_model_dir), "--served-model-name", "toy",
           "--host", "127.0.0.1", "--port", str(port), *ENGINE_FLAGS,
           "--enable-lora", "--lora-modules", f"{ADAPTER}={one_step_lora}",
           "--uvicorn-log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=work)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, url, log, timeout=300, path="/health")
        answers = {name: ask(url, payload) for name, payload in CASES.items()}
        answers["per_request_disable_any_whitespace"] = ask(url, VLLM_PER_REQUEST)
    finally:
        stop_server(proc)
    return answers


@pytest.fixture(scope="module")
def loraplex_urls(vllm_answers, toy_model_dir, one_step_lora, tmp_path_factory):
    """Two `loraplex serve`, started together: "default" (server_env as it is) and "compact"
    (LORAPLEX_ENGINE_ARGS with the whitespace-free structured_outputs_config); the same adapter
    pushed under the same name. Their own servers, not the session's `served`."""
    from loraplex.adapters.registry import Registry

    started = {}
    try:
        for name, engine_args in (("default", None), ("compact", COMPACT)):
            home = tmp_path_factory.mktemp(f"so-loraplex-{name}")
            registry = Registry(f"sqlite:///{home / 'registry.db'}", str(home / "artifacts"))
            registry.register_base("toy", toy_model_dir)
            registry.push(one_step_lora, ADAPTER, base="toy")
            registry.close()
            port, log = free_port(), home / "server.log"
            extra = {"LORAPLEX_ENGINE_ARGS": json.dumps(
                {"structured_outputs_config": engine_args})} if engine_args else {}
            env = server_env(home, port, **extra)
            started[name] = (spawn_server(toy_model_dir, env, log), f"http://127.0.0.1:{port}", log)
        for proc, url, log in started.values():
            wait_ready(proc, url, log, timeout=300)
        yield {name: url for name, (_, url, _) in started.items()}
    finally:
        for proc, _, _ in started.values():
            stop_server(proc)


# -- tests ---------------------------------------------------------------------------------------

def test_vllm_default_grammar_stalls_on_whitespace(vllm_answers):
    """The reference itself shows the issue's symptom: `{`, then only whitespace, to max_tokens."""
    for name in CASES:
        a = vllm_answers[name]
        assert a["tokens"][0] == "{", (name, a)
        assert a["text"].startswith("{") and a["text"][1:].strip() == "", (name, a)
        assert a["finish_reason"] == "length", (name, a)
        assert a["completion_tokens"] == MAX_TOKENS, (name, a)
        assert not parses(a["text"]), (name, a)


def test_vllm_per_request_disable_any_whitespace_has_no_effect(vllm_answers):
    """vLLM 0.32's server takes `structured_outputs.disable_any_whitespace` per request but the
    grammar backends read only the engine's structured_outputs_config: same answer as plain
    json_object, so there is no per-request switch to mirror."""
    assert vllm_answers["per_request_disable_any_whitespace"] == vllm_answers["json_object"]


@pytest.mark.parametrize("case", list(CASES))
def test_loraplex_equals_vllm_with_default_grammar(vllm_answers, loraplex_urls, case):
    """The same request to loraplex (default engine settings): the same text, tokens and finish
    reason as vLLM's own server. The constraint reaches the engine exactly as vLLM's does."""
    assert ask(loraplex_urls["default"], CASES[case]) == vllm_answers[case]


@pytest.mark.parametrize("case", list(CASES))
def test_whitespace_free_grammar_closes_and_parses(loraplex_urls, case):
    """With structured_outputs_config.disable_any_whitespace (an engine setting, through
    LORAPLEX_ENGINE_ARGS) the same request ends by itself within the budget, valid JSON without
    whitespace; a json_schema answer has the schema's keys and value ranges."""
    a = ask(loraplex_urls["compact"], CASES[case])
    assert a["finish_reason"] == "stop", a
    assert a["completion_tokens"] < MAX_TOKENS, a
    value = json.loads(a["text"])
    assert isinstance(value, dict), a
    # No whitespace outside strings, but the one space after a comma xgrammar 0.2.8 puts
    # between free-form items (json_object, schema parts without properties).
    assert not re.search(r"[\n\r\t]|(?<!,) |  ", outside_strings(a["text"])), a
    if case == "json_schema":
        assert set(value) == {"name", "age"}, a
        assert isinstance(value["age"], int) and 0 <= value["age"] <= 120, a
        assert isinstance(value["name"], str) and len(value["name"]) <= 8, a

