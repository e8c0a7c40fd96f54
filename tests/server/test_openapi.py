"""/openapi.json is a valid OpenAPI 3.x document, and the API keeps to it under fuzzing.

The fuzzing is schemathesis over every non-admin operation of the app with the fake engine
of test_app_unit.py (real registry, renderer and tokenizer), sent through one TestClient so
the app's lifespan runs once: bounded (a fixed number of examples per operation and mode,
derandomized), it asserts no 5xx, responses that keep to the documented schemas, and that
every server-sent-event stream ends with `data: [DONE]` (an error event, if any, just before).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field

import pytest
from fastapi.testclient import TestClient

from loraplex.adapters.registry import Registry
from loraplex.server.app import create_app
from loraplex.server.openapi import ERROR_SCHEMA
from loraplex.server.settings import ServerSettings
from tests.server.test_app_unit import FakeEngine

# Examples per operation: valid (steered in part to real models) and invalid bodies; the
# body-less GETs have little to vary.
EXAMPLES = {"positive": 30, "negative": 20, "no_body": 5}
# A longer hunt: LORAPLEX_FUZZ_SCALE=20 runs 20 times the examples, randomized (not the fixed
# derandomized sequence of the default run).
SCALE = int(os.environ.get("LORAPLEX_FUZZ_SCALE", "1"))
ERROR_STATUSES = ("400", "401", "403", "404", "413", "429", "503")


@pytest.fixture(scope="module")
def client(tmp_path_factory, toy_model_dir, one_step_lora):
    tmp = tmp_path_factory.mktemp("openapi")
    registry = Registry(f"sqlite:///{tmp / 'r.db'}", str(tmp / "art"))
    registry.register_base("toy", toy_model_dir)
    registry.push(one_step_lora, "upper", base="toy")
    settings = ServerSettings(home=tmp, model=toy_model_dir, served_model_name="toy",
                              api_keys=["k1"], admin_key="adm", max_queue=2, max_lora_rank=8)
    with TestClient(create_app(settings, FakeEngine(), registry=registry)) as c:
        c.headers["Authorization"] = "Bearer k1"
        yield c


@pytest.fixture(scope="module")
def spec(client) -> dict:
    r = client.get("/openapi.json")
    assert r.status_code == 200, r.text
    return r.json()


def _refs(node, path="#"):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                yield path, v
            else:
                yield from _refs(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _refs(v, f"{path}/{i}")


def _resolve(spec: dict, ref: str):
    assert ref.startswith("#/"), ref
    node = spec
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        node = node[part]  # KeyError: a dangling ref
    return node


def test_spec_is_valid_openapi_with_no_dangling_refs(spec):
    from openapi_spec_validator import validate

    validate(spec)  # raises on an invalid document (OpenAPI 3.1 here)
    assert spec["openapi"].startswith("3.")
    dangling = []
    for where, ref in _refs(spec):
        try:
            _resolve(spec, ref)
        except (KeyError, AssertionError):
            dangling.append((where, ref))
    assert not dangling, dangling
    assert "$defs" not in json.dumps(spec["paths"])


def test_every_route_documents_its_body_and_openai_errors(spec):
    schemas = spec["components"]["schemas"]
    assert {"ChatCompletionRequest", "CompletionRequest", "RenderRequest", "StreamOptions",
            "JsonSchemaFormat", "ErrorResponse"} <= set(schemas)
    for path, body in [("/v1/chat/completions", "ChatCompletionRequest"),
                       ("/v1/completions", "CompletionRequest"), ("/v1/render", "RenderRequest")]:
        rb = spec["paths"][path]["post"]["requestBody"]
        assert rb["required"] is True
        assert rb["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{body}"}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            responses = op["responses"]
            assert "422" not in responses, (method, path)  # never sent: validation is a 400
            if path.startswith(("/v1/", "/admin/")):
                for status in ERROR_STATUSES:
                    schema = responses[status]["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (path, status)
    assert "text/event-stream" in spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]


def test_error_schema_matches_what_the_server_sends(client):
    import jsonschema

    for r in (client.post("/v1/chat/completions", json={"model": "toy"}),          # 400
              client.get("/v1/models", headers={"Authorization": "Bearer nope"}),  # 401
              client.post("/v1/completions", json={"model": "nope", "prompt": "x"}),
              client.get("/v1/nowhere")):
        assert r.status_code >= 400
        jsonschema.validate(r.json(), ERROR_SCHEMA)


RESPONSES_END = ("response.completed", "response.incomplete", "response.failed", "error")


def _sse_problem(text: str, path: str = "") -> str | None:
    """Why a server-sent-event body is broken, or None: `data:` events, each JSON but the
    final `[DONE]`; an error event only as the last one before it. The Responses API has no
    `[DONE]`: its stream ends with a terminal event (completed, incomplete, failed, error)."""
    events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    if path == "/v1/responses":
        try:
            objs = [json.loads(e) for e in events]
        except ValueError:
            return "an event is not JSON"
        if not objs or objs[-1].get("type") not in RESPONSES_END:
            return f"does not end with a terminal event (last: {events[-1:]!r})"
        if any(o.get("type") in RESPONSES_END for o in objs[:-1]):
            return "a terminal event before the last one"
        return None
    if not events or events[-1] != "[DONE]":
        return f"does not end with data: [DONE] (last event: {events[-1:]!r})"
    for i, e in enumerate(events[:-1]):
        try:
            obj = json.loads(e)
        except ValueError:
            return f"event {i} is not JSON: {e[:200]!r}"
        if isinstance(obj, dict) and "error" in obj and i != len(events) - 2:
            return f"error event {i} is not the last before [DONE]"
    return None


def _httpx_kwargs(kw: dict) -> dict:
    """schemathesis' requests-style kwargs -> httpx (TestClient) ones."""
    out = {k: kw[k] for k in ("method", "url", "headers", "params", "json") if kw.get(k) is not None}
    if kw.get("data") is not None:
        out["content"] = kw["data"]
    if kw.get("cookies"):
        out["cookies"] = kw["cookies"]
    return out


MODELS = [None, "toy", "toy", "upper", "upper", "upper@1", "upper:nope", "upper@9"]
BODIES = {"/v1/chat/completions": "ChatCompletionRequest",
          "/v1/completions": "CompletionRequest", "/v1/render": "RenderRequest",
          "/v1/responses": "ResponsesRequest", "/tokenize": "TokenizeRequest",
          "/detokenize": "DetokenizeRequest"}
STREAMED = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
# Dropped from "tame" valid bodies: options that are valid by the schema but refused by design
# (suffix) or that mostly make a request refused (a max_tokens over the context, tools the
# base has no tool format for).
TAMED = ("max_tokens", "max_completion_tokens", "max_output_tokens", "suffix", "top_logprobs",
         "logprobs", "stop", "response_format", "tools", "tool_choice", "logit_bias",
         "stop_token_ids", "min_tokens")


@dataclass
class Fuzzed:
    statuses: dict[str, Counter] = field(default_factory=dict)
    streams: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


def _steer(case, spec: dict, path: str, model, messages, tame: bool, stream) -> None:
    """Point part of the valid bodies at real models and messages (and, when `tame`, only
    documented fields less TAMED), so many reach generation, streamed or not."""
    body = case.body
    if model is not None or tame:
        body["model"] = model or "toy"
    if (messages is not None or tame) and "messages" in body:
        body["messages"] = messages or [{"role": "user", "content": "hi"}]
    if tame:
        known = set(spec["components"]["schemas"][BODIES[path]]["properties"])
        for k in list(body):
            if k in TAMED or k not in known:
                del body[k]
        if "prompt" in body:
            body["prompt"] = "hi"
    if stream and path in STREAMED:
        body["stream"] = True


def _fuzz(client, spec: dict, op, mode, out: Fuzzed) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    name = f"{op.method.upper()} {op.path}"
    seen = out.statuses.setdefault(name, Counter())
    positive = mode is GenerationMode.POSITIVE
    messages_st = st.lists(st.fixed_dictionaries({
        "role": st.sampled_from(["system", "user", "assistant"]),
        "content": st.text(max_size=40)}), min_size=1, max_size=3)
    n = SCALE * (EXAMPLES[mode.value] if op.path in BODIES else EXAMPLES["no_body"])

    @settings(max_examples=n, derandomize=SCALE == 1, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), phases=["explicit", "generate"])
    @given(case=op.as_strategy(generation_mode=mode), model=st.sampled_from(MODELS),
           messages=st.one_of(st.none(), messages_st, messages_st), tame=st.booleans(),
           stream=st.sampled_from([None, True]))
    def run(case, model, messages, tame, stream):
        if positive and isinstance(case.body, dict):
            _steer(case, spec, op.path, model, messages, tame, stream)
        kw = case.as_transport_kwargs(base_url="http://testserver")
        r = client.request(**_httpx_kwargs(kw))
        seen[r.status_code] += 1
        body = kw.get("json")
        shown = json.dumps(body)[:2000] if body is not None else None
        where = f"{name} ({mode.value}) body={shown}"
        ctype = r.headers.get("content-type", "")
        if r.status_code >= 500:
            out.failures.append(f"{where}: {r.status_code} {r.text[:500]}")
            return
        if ctype.startswith("text/event-stream"):
            out.streams["total"] += 1
            if problem := _sse_problem(r.text, op.path):
                out.streams["broken"] += 1
                out.failures.append(f"{where}: broken stream: {problem}")
        elif isinstance(body, dict) and body.get("stream") is True and r.status_code == 200:
            out.failures.append(f"{where}: stream: true answered {ctype}")
        if ctype.startswith("application/json"):
            try:
                case.validate_response(r, checks=[status_code_conformance,
                                                  content_type_conformance,
                                                  response_schema_conformance])
            except Exception as exc:  # schemathesis' FailureGroup
                out.failures.append(f"{where}: {r.status_code} {str(exc)[:800]}")

    try:
        run()
    except Unsatisfiable:  # nothing to negate (a GET with no parameters)
        assert not positive, name


def test_fuzz_non_admin_routes(client, spec):
    """Bounded schemathesis run: no 5xx, documented shapes, no broken streams."""
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_dict(spec)
    ops = [res.ok() for res in schema.get_all_operations()]
    ops = [op for op in ops if not op.path.startswith("/admin/")]
    assert {f"{op.method.upper()} {op.path}" for op in ops} >= {
        "POST /v1/chat/completions", "POST /v1/completions", "POST /v1/render", "GET /v1/models",
        "GET /health", "GET /ready", "GET /metrics"}
    out = Fuzzed()
    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(client, spec, op, mode, out)

    summary = {k: dict(sorted(v.items())) for k, v in out.statuses.items()}
    total = sum(sum(v.values()) for v in out.statuses.values())
    print(f"\nschemathesis: {len(ops)} operations, {total} requests, "
          f"statuses {json.dumps(summary)}, streams {dict(out.streams)}")
    assert not out.failures, "\n".join(out.failures[:20])
    # The fuzzing reached generation, both ways, and not only refusals.
    assert out.statuses["POST /v1/chat/completions"][200]
    assert out.statuses["POST /v1/completions"][200]
    assert out.streams["total"] > 0


def test_sse_checker_flags_broken_streams():
    done = "data: [DONE]\n\n"
    assert _sse_problem('data: {"a": 1}\n\n' + done) is None
    assert _sse_problem('data: {"a": 1}\n\ndata: {"error": {"message": "x"}}\n\n' + done) is None
    assert "does not end" in _sse_problem('data: {"a": 1}\n\n')
    assert "not JSON" in _sse_problem("data: {oops\n\n" + done)
    assert "not the last" in _sse_problem('data: {"error": {}}\n\ndata: {"a": 1}\n\n' + done)
