"""The OpenAI surface beyond chat, against the fake engine (fast): sampling extras, completions
for evaluation (batches, echo, scoring), /tokenize, /detokenize, /tokenizer_info and
GET /v1/models/{id}. The real engine and lm-evaluation-harness: tests/server/test_lm_eval.py."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from loraplex.adapters.chat import load_tokenizer
from loraplex.adapters.registry import Registry
from loraplex.server.app import create_app
from loraplex.server.interface import Chunk, CompletionDelta, TokenLogprob
from loraplex.server.settings import ServerSettings
from tests.server.test_app_unit import FakeEngine


class ScoringEngine(FakeEngine):
    """The fake engine, plus prompt logprobs: token i of the prompt gets logprob -i (the first
    none), the chosen token ranked first, and one output token "!" at -0.5."""

    async def generate(self, req):
        self.requests.append(req)
        s = req.sampling
        plps = None
        if s.prompt_logprobs is not None:
            plps = [None] + [TokenLogprob(f"t{t}", -float(i), [(f"t{t}", -float(i))])
                             for i, t in enumerate(req.prompt_token_ids) if i > 0]
        lps = [TokenLogprob("!", -0.5, [("!", -0.5)])] if s.logprobs is not None else None
        yield Chunk([CompletionDelta(k, "!", [33], lps, "length") for k in range(s.n)],
                    len(req.prompt_token_ids), True, prompt_logprobs=plps)


def _client(tmp_path, toy_model_dir, lora, engine):
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", str(tmp_path / "art"))
    registry.register_base("toy", toy_model_dir)
    registry.push(lora, "upper", base="toy")
    settings = ServerSettings(home=tmp_path, model=toy_model_dir, served_model_name="toy",
                              api_keys=["k1"], max_lora_rank=8)
    with TestClient(create_app(settings, engine, registry=registry)) as client:
        client.headers["Authorization"] = "Bearer k1"
        yield client, engine


@pytest.fixture
def scoring(tmp_path, toy_model_dir, one_step_lora):
    yield from _client(tmp_path, toy_model_dir, one_step_lora, ScoringEngine())


@pytest.fixture
def fake(tmp_path, toy_model_dir, one_step_lora):
    yield from _client(tmp_path, toy_model_dir, one_step_lora, FakeEngine())


def test_echo_with_logprobs_scores_the_prompt_as_vllm_shapes_it(scoring, toy_model_dir):
    client, engine = scoring
    ids = load_tokenizer(toy_model_dir).encode("the cat sat")
    r = client.post("/v1/completions", json={"model": "upper", "prompt": [ids, ids[:2]],
                                             "echo": True, "logprobs": 1, "max_tokens": 1})
    assert r.status_code == 200, r.text
    sent = engine.requests[-2:]
    assert [g.sampling.prompt_logprobs for g in sent] == [1, 1]
    assert all(g.lora is not None for g in sent)  # a batch runs on the adapter too
    c0, c1 = r.json()["choices"]
    assert (c0["index"], c1["index"]) == (0, 1)
    lp = c0["logprobs"]
    # prompt tokens first (the first has no context: null), then the generated one
    assert lp["token_logprobs"] == [None, *[-float(i) for i in range(1, len(ids))], -0.5]
    assert lp["top_logprobs"][0] is None and lp["top_logprobs"][-1] == {"!": -0.5}
    assert c0["text"].endswith("!") and c0["text"].startswith("the")
    assert lp["text_offset"][0] == 0 and len(lp["tokens"]) == len(ids) + 1
    # max_tokens 0: the prompt scored, nothing generated returned (the engine is asked for 1)
    r = client.post("/v1/completions", json={"model": "upper", "prompt": ids, "echo": True,
                                             "logprobs": 0, "max_tokens": 0})
    c = r.json()["choices"][0]
    assert engine.requests[-1].sampling.max_tokens == 1
    assert len(c["logprobs"]["tokens"]) == len(ids) and not c["text"].endswith("!")
    assert r.json()["usage"]["completion_tokens"] == 0
    for bad in ({"max_tokens": 0}, {"max_tokens": 0, "echo": True, "stream": True},
                {"logprobs": 6}):
        r = client.post("/v1/completions", json={"model": "upper", "prompt": "x", **bad})
        assert r.status_code == 400, (bad, r.text)


def test_sampling_extras_reach_the_engine_and_are_checked(fake):
    client, engine = fake
    body = {"model": "toy", "messages": [{"role": "user", "content": "hi"}], "top_k": 5,
            "min_p": 0.1, "repetition_penalty": 1.2, "min_tokens": 2, "logit_bias": {"7": -100},
            "stop_token_ids": [3], "skip_special_tokens": False,
            "include_stop_str_in_output": True}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    s = engine.requests[-1].sampling
    assert (s.top_k, s.min_p, s.repetition_penalty, s.min_tokens) == (5, 0.1, 1.2, 2)
    assert s.logit_bias == {7: -100.0} and 3 in s.stop_token_ids
    assert s.skip_special_tokens is False and s.include_stop_str_in_output is True
    for bad, param in (({"logit_bias": {"x": 1}}, "logit_bias"),
                       ({"logit_bias": {"7": 101}}, "logit_bias"),
                       ({"logit_bias": {"99999999": 1}}, "logit_bias"),
                       ({"stop_token_ids": [99999999]}, "stop_token_ids"),
                       ({"min_p": 2}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
                       ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
                       ({"tool_choice": "required"}, "tool_choice")):
        r = client.post("/v1/chat/completions", json={**body, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)


def test_tokenize_detokenize_and_tokenizer_info(fake, toy_model_dir):
    client, _ = fake
    tok = load_tokenizer(toy_model_dir)
    r = client.post("/tokenize", json={"prompt": "hello world", "add_special_tokens": False})
    assert r.json()["tokens"] == tok.encode("hello world") and r.json()["max_model_len"] == 256
    msgs = [{"role": "user", "content": "hi"}]
    rendered = client.post("/v1/render", json={"model": "upper", "messages": msgs}).json()
    r = client.post("/tokenize", json={"model": "upper", "messages": msgs})
    assert r.json()["tokens"] == rendered["token_ids"]
    r = client.post("/detokenize", json={"tokens": tok.encode("hello world")})
    assert r.json()["prompt"] == "hello world"
    assert client.post("/detokenize", json={"tokens": [10 ** 9]}).status_code == 400
    assert client.post("/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] and "chat_template" in info and info["model_max_length"] == 256
    assert client.get("/tokenizer_info", headers={"Authorization": "Bearer bad"}).status_code == 401


def test_get_one_model(fake, tmp_path, one_step_lora):
    client, _ = fake
    assert client.get("/v1/models/toy").json()["parent"] is None
    one = client.get("/v1/models/upper@1").json()
    assert one["id"] == "upper@1" and one["parent"] == "toy" and "tool_format" in one
    r = client.get("/v1/models/upper@9")
    assert r.status_code == 404 and "version" in r.json()["error"]["message"]
    assert client.get("/v1/models/nope").status_code == 404
    # Pushed by another process after the server's snapshot: found now, not at the next poll.
    Registry(f"sqlite:///{tmp_path / 'r.db'}", str(tmp_path / "art")).push(
        one_step_lora, "later", base="toy")
    assert client.get("/v1/models/later").json()["id"] == "later"
