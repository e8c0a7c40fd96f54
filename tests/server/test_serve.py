"""The server end to end: real engine, real HTTP, the official `openai` client.

Adapters: `upper` shouts the user's words, `reverse` reverses them (quick PEFT tunes from the
root conftest), both registered before the server starts; tests that need more register their
own under unique names.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

pytestmark = pytest.mark.engine


def ask(client, model: str, question: str, **kw) -> str:
    kw.setdefault("max_tokens", 16)
    kw.setdefault("temperature", 0)
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], **kw)
    return r.choices[0].message.content


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_models_lists_base_adapters_versions(served):
    ids = {m.id for m in served.client().models.list().data}
    assert {"toy", "upper", "upper@1", "reverse", "reverse@1"} <= ids
    raw = httpx.get(served.v1 + "/models", headers={"Authorization": "Bearer test-key"}).json()
    upper = next(m for m in raw["data"] if m["id"] == "upper")
    assert upper["parent"] == "toy" and upper["versions"] == [1]
    assert len(upper["chat_template_sha256"]) == 64


def test_mixed_adapters_concurrently_equal_each_alone(served, task_prompts):
    questions = [q for q, _ in task_prompts("upper", 4, seed=7)]
    jobs = [(m, q) for q in questions for m in ("toy", "upper", "reverse")]
    c = served.client()
    alone = {(m, q): ask(c, m, q) for m, q in jobs}

    async def together():
        ac = served.async_client()
        async def one(m, q):
            r = await ac.chat.completions.create(
                model=m, messages=[{"role": "user", "content": q}], max_tokens=16, temperature=0)
            return r.choices[0].message.content
        return await asyncio.gather(*(one(m, q) for m, q in jobs))

    mixed = dict(zip(jobs, asyncio.run(together())))
    assert mixed == alone
    # and the adapters really are different models from the base and from each other
    for q in questions:
        assert len({alone[("toy", q)], alone[("upper", q)], alone[("reverse", q)]}) == 3, q
    assert all(alone[("upper", q)].strip() == alone[("upper", q)].strip().upper() for q in questions)


def test_streaming_equals_non_streaming_and_reports_usage(served):
    c = served.client()
    q = "cat dog bird"
    whole = ask(c, "upper", q)
    chunks = list(c.chat.completions.create(
        model="upper", messages=[{"role": "user", "content": q}], max_tokens=16, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert chunks[-2].choices[0].finish_reason == "stop"


def test_completions_and_logprobs(served):
    c = served.client()
    r = c.completions.create(model="toy", prompt="After 41 comes", max_tokens=4, temperature=0,
                             logprobs=2)
    assert r.choices[0].text and len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens
    r = c.chat.completions.create(model="upper", messages=[{"role": "user", "content": "cat"}],
                                  max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    first = r.choices[0].logprobs.content[0]
    assert len(first.top_logprobs) == 2 and first.logprob <= 0
    assert first.token == first.top_logprobs[0].token  # greedy picks the top one


def test_adapter_pushed_while_running_is_served_within_5s(served, test_loras, task_prompts):
    name = unique("fresh")
    t0 = time.monotonic()
    served.registry.push(test_loras["reverse"], name, base="toy")
    c = served.client()
    while True:
        try:
            answer = ask(c, name, "cat dog")
            break
        except openai.NotFoundError:
            assert time.monotonic() - t0 < 5, "not served within 5 s of the push"
            time.sleep(0.2)
    assert time.monotonic() - t0 < 5
    assert answer == ask(c, "reverse", "cat dog")
    # the poller also shows it in /v1/models within the poll interval
    deadline = time.monotonic() + 5
    while name not in {m.id for m in c.models.list().data}:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_alias_move_switches_answers_without_stale_cache(served, test_loras):
    name = unique("switch")
    v1 = served.registry.push(test_loras["upper"], name, base="toy").version.version
    v2 = served.registry.push(test_loras["reverse"], name, base="toy").version.version
    c = served.client()
    q = "apple pear plum"
    want = {v1: ask(c, "upper", q), v2: ask(c, "reverse", q)}
    assert want[v1] != want[v2]
    admin = {"Authorization": f"Bearer {served.admin_key}"}
    for target in (v1, v2, v1):
        r = httpx.put(f"{served.url}/admin/aliases/{name}/prod", params={"target": str(target)},
                      headers=admin)
        assert r.status_code == 200, r.text
        # A bare name means :prod. The same prompt (same prefix blocks) right after the move
        # must come from the new version: each version has its own LoRA id and cache.
        for _ in range(2):
            assert ask(c, name, q) == want[target]
            assert ask(c, f"{name}:prod", q) == want[target]
    # a move made directly in the registry (another replica, the CLI) arrives by polling
    served.registry.set_alias(name, "prod", v2)
    deadline = time.monotonic() + 5
    while ask(c, name, q) != want[v2]:
        assert time.monotonic() < deadline, "alias move not seen within 5 s"
        time.sleep(0.2)
    assert all(ask(c, name, q) == want[v2] for _ in range(3))


def test_weighted_alias_is_sticky_per_user(served, test_loras):
    name = unique("canary")
    served.registry.push(test_loras["upper"], name, base="toy")
    served.registry.push(test_loras["reverse"], name, base="toy")
    served.registry.set_alias(name, "prod", "1:50,2:50")
    c = served.client()
    time.sleep(1.5)
    per_user = {}
    for user in (f"u{i}" for i in range(12)):
        answers = {ask(c, name, "cat dog", user=user) for _ in range(2)}
        assert len(answers) == 1, f"user {user} was not sticky: {answers}"
        per_user[user] = answers.pop()
    assert len(set(per_user.values())) == 2, "a 50:50 split sent 12 users to one version"


def _corrupt_copy(served, src, name):
    v = served.registry.push(src, name, base="toy").version
    weights = next((served.home / "artifacts").glob(f"adapters/{name}/*/files/adapter_model.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-100:] = bytes(100)
    weights.write_bytes(bytes(data))
    return v


def test_errors_are_clear_and_harm_no_one(served, test_loras, toy_model_dir, tmp_path, lora_trainer):
    c = served.client()
    good = ask(c, "upper", "cat dog")

    with pytest.raises(openai.NotFoundError) as e:
        ask(c, "no-such-adapter", "hi")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"

    with pytest.raises(openai.BadRequestError) as e:
        ask(c, "upper", "hi", temperature=7)
    assert e.value.body["param"] == "temperature" and "7" in e.value.body["message"]

    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="upper", messages=[{"role": "robot", "content": "x"}])
    assert "role" in e.value.body["param"] and "robot" in e.value.body["message"]

    with pytest.raises(openai.BadRequestError) as e:
        ask(c, "upper", "hi", max_tokens=100_000)
    assert e.value.body["code"] == "context_length_exceeded"

    corrupt = unique("corrupt")
    _corrupt_copy(served, test_loras["upper"], corrupt)
    with pytest.raises(openai.BadRequestError) as e:
        ask(c, corrupt, "hi")
    assert e.value.body["code"] == "adapter_invalid" and "sha256" in e.value.body["message"]

    wide = unique("wide")
    served.registry.push(lora_trainer(toy_model_dir, tmp_path / "wide", "upper", rank=16, steps=1), wide,
                         base="toy")
    with pytest.raises(openai.BadRequestError) as e:
        ask(c, wide, "hi")
    assert e.value.body["code"] == "adapter_incompatible" and "rank 16" in e.value.body["message"]

    # What vLLM itself refuses is a 400 naming the parameter, before any stream starts.
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            ask(c, "upper", "hi", stop=["x", ""], stream=stream)
        assert e.value.body["param"] == "stop"

    # n > 1 at temperature 0 (vLLM refuses greedy n > 1): n answers, each the greedy one.
    r = c.chat.completions.create(model="upper", n=2, temperature=0, max_tokens=16,
                                  messages=[{"role": "user", "content": "cat dog"}])
    assert [ch.message.content for ch in r.choices] == [good, good]

    # nothing above harmed the server or the other adapters
    assert ask(c, "upper", "cat dog") == good
    assert httpx.get(served.url + "/ready").status_code == 200


def test_auth(served):
    from openai import OpenAI

    bad = OpenAI(base_url=served.v1, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        ask(bad, "toy", "hi")
    r = httpx.post(f"{served.url}/admin/adapters/upper/load", headers={"Authorization": "Bearer test-key"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = httpx.post(f"{served.url}/admin/adapters/upper/load")
    assert r.status_code == 401
    assert httpx.get(served.url + "/health").status_code == 200
    assert httpx.get(served.url + "/metrics").status_code == 200


def test_render_matches_what_is_served(served, toy_model_dir):
    from loraplex.adapters import chat

    h = {"Authorization": "Bearer test-key"}
    msgs = [{"role": "user", "content": "cat dog"}]
    r = httpx.post(served.v1 + "/render", json={"model": "upper", "messages": msgs}, headers=h)
    assert r.status_code == 200, r.text
    body = r.json()
    v = served.registry.resolve("upper")
    assert body["adapter"] == "upper@1" and body["prompt"].endswith("<|im_start|>assistant\n")
    assert body["chat_template_sha256"] == v.chat_template_sha256
    # the shared rendering function, called here directly, gives the very same ids
    local = chat.render(v.chat_template, msgs, chat.load_tokenizer(toy_model_dir))
    assert body["token_ids"] == local.token_ids and body["prompt"] == local.text
    # ChatML ends a turn with <|im_end|>: it is the first stop token sent to the engine
    assert body["stop_token_ids"][0] == chat.load_tokenizer(toy_model_dir).token_to_id("<|im_end|>")


def test_disconnect_aborts_the_engine_request(served):
    h = {"Authorization": "Bearer test-key"}
    body = {"model": "toy", "messages": [{"role": "user", "content": "Tell me a sentence."}],
            "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", served.v1 + "/chat/completions", json=body, headers=h, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]
    assert any(line.startswith("data:") for line in got)

    def gauge(name: str) -> float:
        text = httpx.get(served.url + "/metrics").text
        vals = [float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                if ln.startswith(name) and not ln.startswith("#")]
        return sum(vals)

    deadline = time.monotonic() + 10
    while gauge("loraplex_requests_in_flight") > 0 or gauge("vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "the abandoned stream kept running in the engine"
        time.sleep(0.2)
    text = httpx.get(served.url + "/metrics").text
    assert 'status="499"' in text


def test_metrics_vllm_series_and_ours_pass_promtool(served, tmp_path):
    ask(served.client(), "reverse", "cat dog")
    text = httpx.get(served.url + "/metrics").text
    for series in ("vllm:num_requests_waiting", "vllm:lora_requests_info",
                   'loraplex_requests_total{adapter="reverse",endpoint="chat",status="200",version="1"}',
                   "loraplex_time_to_first_token_seconds_bucket", "loraplex_adapter_load_seconds",
                   'loraplex_adapter_resident{adapter="reverse",tier="host",version="1"} 1.0',
                   # asked just now, so in one of vLLM's batch slots (read from its worker)
                   'loraplex_adapter_resident{adapter="reverse",tier="accelerator",version="1"} 1.0',
                   'loraplex_adapter_resident{adapter="reverse",tier="disk",version="1"} 1.0'):
        assert series in text, series
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (make setup installs Debian's prometheus)")
    ours = "\n".join(ln for ln in text.splitlines() if "loraplex_" in ln) + "\n"
    r = subprocess.run([promtool, "check", "metrics"], input=ours, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_admin_registers_an_uploaded_archive_then_pins_it(served, test_loras):
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(test_loras["upper"], arcname="adapter")
    name = unique("uploaded")
    admin = {"Authorization": f"Bearer {served.admin_key}"}
    r = httpx.post(f"{served.url}/admin/adapters", params={"name": name, "alias": "prod"},
                   content=buf.getvalue(), headers=admin, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["version"]["version"] == 1 and r.json()["created"] is True
    c = served.client()
    prompts = ["cat dog", "red blue green", "one two", "sun moon star"]
    alone = {(m, p): ask(c, m, p) for m in ("upper", "reverse") for p in prompts}
    r = httpx.post(f"{served.url}/admin/adapters/{name}:prod/pin", headers=admin, timeout=60)
    assert r.status_code == 200 and r.json() == {"pinned": f"{name}@1"}
    assert ask(c, f"{name}:prod", "cat dog") == ask(c, "upper", "cat dog")
    pin_series = f'loraplex_adapter_resident{{adapter="{name}",tier="pinned",version="1"}} 1.0'
    assert pin_series in httpx.get(served.url + "/metrics").text  # as vLLM's worker holds it
    # With the pin held, steps that batch max_loras (2) *other* adapters still run and answer
    # right. vLLM's own pin also took a batch slot its scheduler did not know about: the first
    # such step killed the engine (KeyError in convert_mapping).
    with ThreadPoolExecutor(8) as pool:
        jobs = [(key, pool.submit(ask, c, *key)) for key in list(alone) * 2]
        wrong = [(key, job.result()) for key, job in jobs if job.result() != alone[key]]
    assert not wrong, wrong
    # Released in the worker (nothing re-read); the adapter still answers the same.
    r = httpx.post(f"{served.url}/admin/adapters/{name}@1/unpin", headers=admin, timeout=60)
    assert r.status_code == 200 and r.json() == {"unpinned": f"{name}@1"}
    assert pin_series not in httpx.get(served.url + "/metrics").text
    assert ask(c, f"{name}:prod", "cat dog") == ask(c, "upper", "cat dog")
    # a link or a path escaping the archive is refused, and nothing is registered
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escape.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    bad = unique("evil")
    r = httpx.post(f"{served.url}/admin/adapters", params={"name": bad}, content=evil.getvalue(),
                   headers=admin)
    assert r.status_code == 400 and "escapes" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        ask(c, bad, "hi")
