"""Tool calling through a real `loraplex serve` with the official `openai` client.

The toy adapters were never trained to call tools, so `required` and named `tool_choice` (which
constrained decoding enforces) are what makes them call here; `auto` with a model that learned
tool use is tests/server/test_tool_adapter.py's end-to-end case. The same weights are pushed under
several names with different tool formats: each answers in its own format in one server, the
one thing vLLM's single-parser server cannot do.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from tests.server.conftest import Served, serving, toy_registry

pytestmark = pytest.mark.engine

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city", "strict": True,
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}}}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two digits", "strict": True,
    "parameters": {"type": "object", "additionalProperties": False, "required": ["a", "b"],
                   "properties": {"a": {"type": "integer", "enum": [1, 2, 3]},
                                  "b": {"type": "integer", "enum": [4, 5, 6]}}}}}
TOOLS = [WEATHER, ADD]
HERMES = Path(__file__).resolve().parents[2] / "adapters" / "templates" / "hermes.jinja"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@dataclass
class ToolServer:
    served: Served
    names: dict  # tool format (None: pushed without one) -> adapter name


# vLLM's JSON grammars allow any whitespace, and the untrained toy fills max_tokens with it
# (docs/structured_output.md); the whitespace-free grammar is what a deployment of small models
# would set too.
WHITESPACE_FREE = '{"structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": true}}'


@pytest.fixture(scope="module")
def tools_server(toy_model_dir, test_loras, tmp_path_factory):
    home = tmp_path_factory.mktemp("tools-home")
    registry = toy_registry(home, toy_model_dir)
    names = {}
    for fmt in ("hermes", "pythonic", "xlam", None):
        names[fmt] = f"tools-{fmt or 'none'}"
        # The toy's own template (ChatML) ignores tools; the built-in hermes one (Qwen2.5's)
        # lists them in the system prompt and writes calls and results.
        registry.push(test_loras["upper"], names[fmt], base="toy", tool_format=fmt,
                      chat_template=HERMES)
    # The hermes system prompt with two tools is ~800 tokens of the toy tokenizer.
    with serving(toy_model_dir, home, registry, LORAPLEX_ENGINE_ARGS=WHITESPACE_FREE,
                 LORAPLEX_MAX_MODEL_LEN="1024") as served:
        yield ToolServer(served, names)


def _call(client, model, **kw):
    kw.setdefault("max_tokens", 60)
    return client.chat.completions.create(model=model, messages=ASK, tools=TOOLS,
                                          temperature=0, **kw)


@pytest.mark.parametrize("fmt", ["pythonic", "xlam"])
def test_required_and_named_calls_parse_in_each_format(tools_server, fmt):
    c = tools_server.served.client()
    named = tools_server.names
    # parallel_tool_calls false: one call (maxItems 1), else an untrained model may go on
    # adding calls to the array until max_tokens.
    r = _call(c, named[fmt], tool_choice="required", parallel_tool_calls=False)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls", ch
    calls = ch.message.tool_calls
    assert calls and all(t.function.name in ("get_weather", "add") for t in calls)
    for t in calls:  # arguments follow the strict schema
        args = json.loads(t.function.arguments)
        assert set(args) == ({"city"} if t.function.name == "get_weather" else {"a", "b"})
    r = _call(c, named[fmt], tool_choice={"type": "function", "function": {"name": "add"}})
    ch = r.choices[0]
    assert [t.function.name for t in ch.message.tool_calls] == ["add"]
    assert ch.finish_reason == "stop"  # a named call ends with stop, as OpenAI and vLLM
    args = json.loads(ch.message.tool_calls[0].function.arguments)
    assert args["a"] in (1, 2, 3) and args["b"] in (4, 5, 6)


def test_two_formats_answer_in_one_server_concurrently(tools_server):
    ac = tools_server.served.async_client()
    named = tools_server.names

    async def both():
        return await asyncio.gather(*(
            ac.chat.completions.create(model=named[f], messages=ASK, tools=TOOLS, temperature=0,
                                       max_tokens=60, tool_choice="required",
                                       parallel_tool_calls=False)
            for f in ("pythonic", "xlam")))

    for r in asyncio.run(both()):
        assert r.choices[0].message.tool_calls, r


@pytest.mark.parametrize("fmt", ["pythonic", "xlam"])
def test_streamed_tool_call_deltas_reassemble_to_the_call(tools_server, fmt):
    c = tools_server.served.client()
    named = tools_server.names
    whole = _call(c, named[fmt], tool_choice="required",
                  parallel_tool_calls=False).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish = None
    for chunk in _call(c, named[fmt], tool_choice="required", parallel_tool_calls=False,
                       stream=True):
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            for d in ch.delta.tool_calls or []:
                cur = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                cur["id"] = cur["id"] or d.id
                cur["name"] += (d.function.name or "") if d.function else ""
                cur["arguments"] += (d.function.arguments or "") if d.function else ""
    assert finish == "tool_calls"
    assert [(v["name"], json.loads(v["arguments"])) for _, v in sorted(calls.items())] == \
        [(t.function.name, json.loads(t.function.arguments)) for t in whole]
    assert all(v["id"] for v in calls.values())


def test_auto_and_none_and_the_follow_up_turn(tools_server):
    c = tools_server.served.client()
    named = tools_server.names
    m = named["xlam"]
    # auto: the untrained toy answers in text; parsed as content, no calls, finish stop/length
    r = _call(c, m, tool_choice="auto", max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length") and not r.choices[0].message.tool_calls
    # none: tools are rendered but never parsed (and needs no format)
    r = _call(c, named[None], tool_choice="none", max_tokens=8)
    assert r.choices[0].message.content is not None
    # the follow-up turn: assistant tool_calls with content null, then the tool's result
    call = _call(c, m, tool_choice={"type": "function", "function": {"name": "get_weather"}}
                 ).choices[0].message.tool_calls[0]
    follow = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    r = c.chat.completions.create(model=m, messages=follow, tools=TOOLS, temperature=0,
                                  max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the template saw the call and the result (what the engine was sent)
    rendered = c.post("/render", cast_to=object, body={"model": m, "messages": follow,
                                                       "tools": TOOLS})
    prompt = rendered["prompt"]
    assert "<tools>" in prompt and '"name": "add"' in prompt  # the tool definitions
    args = json.dumps(json.loads(call.function.arguments))  # re-serialized by the template
    assert f'<tool_call>\n{{"name": "get_weather", "arguments": {args}}}' in prompt
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt  # the result


def test_parallel_tool_calls_false_keeps_one_call(tools_server):
    r = _call(tools_server.served.client(), tools_server.names["pythonic"], tool_choice="required",
              parallel_tool_calls=False)
    assert len(r.choices[0].message.tool_calls) == 1


def test_tools_without_a_tool_format_are_a_400_not_a_text_answer(tools_server):
    c = tools_server.served.client()
    named = tools_server.names
    for choice in ("auto", "required"):
        with pytest.raises(openai.BadRequestError) as exc:
            _call(c, named[None], tool_choice=choice)
        err = exc.value.body
        assert err["param"] == "tools" and "--tool-format" in err["message"]
    with pytest.raises(openai.BadRequestError) as exc:  # the base: no LORAPLEX_TOOL_FORMAT
        _call(c, "toy")
    assert "LORAPLEX_TOOL_FORMAT" in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:  # named function not in tools
        _call(c, named["hermes"], tool_choice={"type": "function", "function": {"name": "nope"}})
    assert exc.value.body["param"] == "tool_choice"
