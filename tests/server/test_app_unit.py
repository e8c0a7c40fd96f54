"""Fast tests of the HTTP layer over a fake engine: OpenAI shapes, errors, auth, admission.

The fake stands in for vLLM only; the registry (SQLite), rendering and tokenizer are real.
The same behaviours against the real engine are in test_serve.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from loraplex.adapters.registry import Registry
from loraplex.server.app import create_app
from loraplex.server.interface import Chunk, CompletionDelta, GenRequest, LoraRef
from loraplex.server.settings import ServerSettings


class FakeEngine:
    """Answers `echo:<lora or base>:<n prompt tokens>` one character per chunk."""

    max_model_len = 256

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.requests: list[GenRequest] = []
        self.aborted: list[str] = []
        self.loras: dict[int, LoraRef] = {}
        self.ready = False

    async def start(self):
        self.ready = True

    async def stop(self):
        self.ready = False

    async def generate(self, req: GenRequest):
        self.requests.append(req)
        text = f"echo:{req.lora.key if req.lora else 'base'}:{len(req.prompt_token_ids)}"
        text = text[: req.sampling.max_tokens]
        finished = False
        try:
            for i, ch in enumerate(text):
                await asyncio.sleep(self.delay)
                last = i == len(text) - 1
                finished = last
                yield Chunk(deltas=[CompletionDelta(index=k, text=ch, token_ids=[i],
                                                    finish_reason=("length" if len(text) == req.sampling.max_tokens else "stop") if last else None)
                                    for k in range(req.sampling.n)],
                            prompt_tokens=len(req.prompt_token_ids), finished=last)
        finally:
            if not finished:
                self.aborted.append(req.request_id)

    def check(self, req):
        from loraplex.adapters.errors import BadRequest

        if any(not s for s in req.sampling.stop):  # as vLLM does
            raise BadRequest("stop cannot contain an empty string", param="stop")

    async def abort(self, request_id):
        self.aborted.append(request_id)

    async def add_lora(self, lora):
        self.loras[lora.int_id] = lora

    async def remove_lora(self, lora):
        self.loras.pop(lora.int_id, None)

    async def pin_lora(self, lora):
        pass

    async def unpin_lora(self, lora):
        pass

    async def lora_residency(self):
        return {i: {"host", "accelerator"} for i in self.loras}

    async def check_health(self):
        pass


@pytest.fixture
def app_and_engine(tmp_path, toy_model_dir, one_step_lora):
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", str(tmp_path / "art"))
    registry.register_base("toy", toy_model_dir)
    registry.push(one_step_lora, "upper", base="toy")
    settings = ServerSettings(home=tmp_path, model=toy_model_dir, served_model_name="toy",
                              api_keys=["k1"], admin_key="adm", max_queue=2, max_lora_rank=8)
    engine = FakeEngine()
    app = create_app(settings, engine, registry=registry)
    with TestClient(app) as client:
        client.headers["Authorization"] = "Bearer k1"
        yield client, engine


def chat(client, **body):
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return client.post("/v1/chat/completions", json={"model": "toy", **body})


def test_chat_shape_usage_and_adapter_routing(app_and_engine):
    client, engine = app_and_engine
    r = chat(client)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"].startswith("echo:base:")
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["completion_tokens"] > 0
    r = chat(client, model="upper")
    assert r.json()["choices"][0]["message"]["content"].startswith("echo:upper@1:")
    # the adapter's stop token (<|im_end|> for its ChatML template) went to the engine
    assert engine.requests[-1].sampling.stop_token_ids and engine.requests[-1].lora.int_id > 0


def test_stream_is_sse_with_done_and_usage(app_and_engine):
    client, _ = app_and_engine
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "toy", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}, "n": 2}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert {c["index"] for e in events[1:-1] for c in e["choices"]} == {0, 1}
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] > 0
    assert r.headers["x-loraplex-model"] == "toy"


def test_the_answering_version_is_in_a_header(app_and_engine, tmp_path):
    """`name`, `name:alias` and `name@N` each resolve to one version; the header names it, on
    JSON and streamed answers alike."""
    client, _ = app_and_engine
    assert chat(client).headers["x-loraplex-model"] == "toy"
    for model in ("upper", "upper@1"):
        assert chat(client, model=model).headers["x-loraplex-model"] == "upper@1"
    with client.stream("POST", "/v1/completions", json={
            "model": "upper", "prompt": "hi", "max_tokens": 2, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["x-loraplex-model"] == "upper@1"


@pytest.mark.parametrize("body, status, param, code", [
    ({"temperature": 3}, 400, "temperature", "invalid_value"),
    ({"top_p": 0}, 400, "top_p", "invalid_value"),
    ({"n": 0}, 400, "n", "invalid_value"),
    ({"max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"max_tokens": 10_000}, 400, "max_tokens", "context_length_exceeded"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    ({"messages": []}, 400, "messages", "invalid_value"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "invalid_value"),
    ({"top_logprobs": 3}, 400, "top_logprobs", "invalid_value"),
    ({"model": "nope"}, 404, "model", "model_not_found"),
    ({"model": "upper@9"}, 404, "model", "model_not_found"),
    ({"model": "upper:prod"}, 404, "model", "model_not_found"),
    ({"model": "../etc"}, 400, "model", "invalid_value"),
    ({"response_format": {"type": "json_schema"}}, 400, "response_format", "invalid_value"),
])
def test_bad_requests_are_openai_errors_naming_param(app_and_engine, body, status, param, code):
    client, engine = app_and_engine
    r = chat(client, **body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == code, err
    assert err["message"] and err["type"]
    assert not engine.requests  # nothing reached the engine


def test_not_json_and_not_object(app_and_engine):
    client, _ = app_and_engine
    r = client.post("/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    r = client.post("/v1/chat/completions", json=[1, 2])
    assert r.status_code == 400


def test_auth_and_admin(app_and_engine):
    client, _ = app_and_engine
    assert client.post("/v1/chat/completions", json={}, headers={"Authorization": "Bearer bad"}).status_code == 401
    assert client.get("/health", headers={"Authorization": ""}).status_code == 200
    assert client.get("/ready", headers={"Authorization": ""}).status_code == 200
    assert client.post("/admin/adapters/upper/load").status_code == 403  # an API key, not admin
    r = client.post("/admin/adapters/upper/load", headers={"Authorization": "Bearer adm"})
    assert r.status_code == 200 and r.json() == {"loaded": "upper@1"}


def test_queue_full_is_429(tmp_path, toy_model_dir):
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", str(tmp_path / "art"))
    settings = ServerSettings(home=tmp_path, model=toy_model_dir, served_model_name="toy", max_queue=1)
    app = create_app(settings, FakeEngine(delay=0.2), registry=registry)

    import httpx

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            body = {"model": "toy", "messages": [{"role": "user", "content": "hi"}]}
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=body) for _ in range(3)))

    with TestClient(app):  # runs the lifespan
        codes = sorted(r.status_code for r in asyncio.run(main()))
    assert codes[0] == 200 and 429 in codes


def test_completions_prompt_forms(app_and_engine):
    client, _ = app_and_engine
    for prompt in ("hello", [1, 2, 3], ["hello"]):
        r = client.post("/v1/completions", json={"model": "toy", "prompt": prompt, "max_tokens": 30})
        assert r.status_code == 200, r.text
        assert r.json()["object"] == "text_completion"
    # A batch: one choice per prompt (and n), indexed prompt-major as vLLM's server does.
    r = client.post("/v1/completions", json={"model": "toy", "prompt": [[4], [1, 2, 3]],
                                             "n": 2, "max_tokens": 30})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert [c["text"] for c in choices] == ["echo:base:1"] * 2 + ["echo:base:3"] * 2
    r = client.post("/v1/completions", json={"model": "toy", "prompt": ["a", [1, 2, 3]]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = client.post("/v1/completions", json={"model": "toy", "prompt": ["a"] * 257})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = client.post("/v1/completions", json={"model": "toy", "prompt": [99999]})
    assert r.status_code == 400


def test_refused_requests_are_counted_by_status(app_and_engine):
    client, _ = app_and_engine
    chat(client, model="nope")
    chat(client, temperature=9)
    client.post("/v1/chat/completions", json={}, headers={"Authorization": "Bearer bad"})
    text = client.get("/metrics").text
    for status in ("404", "400", "401"):
        assert f'loraplex_requests_total{{adapter="",endpoint="chat",status="{status}",version=""}} 1.0' in text


def test_residency_tiers_come_from_the_engine_with_a_fallback(app_and_engine):
    client, engine = app_and_engine
    assert chat(client, model="upper").status_code == 200
    text = client.get("/metrics").text
    for tier in ("accelerator", "host", "disk"):
        assert f'loraplex_adapter_resident{{adapter="upper",tier="{tier}",version="1"}} 1.0' in text

    async def broken():  # an engine that cannot tell: the server reports what it handed over
        raise RuntimeError("engine busy")

    engine.lora_residency = broken
    text = client.get("/metrics").text
    assert client.get("/metrics").status_code == 200
    assert 'loraplex_adapter_resident{adapter="upper",tier="host",version="1"} 1.0' in text
    assert 'tier="accelerator"' not in text


def test_serve_freezes_the_startup_heap_for_the_collector(tmp_path, toy_model_dir):
    """`loraplex serve` (freeze_gc=True) moves what the start allocated out of the garbage
    collector's sight while it serves, as vLLM's server does: a full collection over it took
    0.7 s here (docs/benchmarks.md), during which no stream moves. Given back on shutdown."""
    import gc

    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", str(tmp_path / "art"))
    settings = ServerSettings(home=tmp_path, model=toy_model_dir, served_model_name="toy")
    before = gc.get_freeze_count()
    with TestClient(create_app(settings, FakeEngine(), registry=registry, freeze_gc=True)) as c:
        assert gc.get_freeze_count() > before
        assert c.get("/health").status_code == 200
    assert gc.get_freeze_count() == 0
    with TestClient(create_app(settings, FakeEngine(), registry=registry)):
        assert gc.get_freeze_count() == 0  # the default: tests start many apps in one process
