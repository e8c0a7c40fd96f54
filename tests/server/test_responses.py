"""POST /v1/responses: shapes, refusals, the event stream, tool-call items, and the clients
that must work against it (the `openai` SDK, LangChain's ChatOpenAI with the Responses API,
the OpenAI Agents SDK), over the fake engine; then the real engine once (marked `engine`).
"""

from __future__ import annotations

import json

import openai
import pytest
from fastapi.testclient import TestClient
from openai.types.responses import Response

from loraplex.adapters.errors import BadRequest
from loraplex.adapters.registry import Registry
from loraplex.server.app import create_app
from loraplex.server.engine.tool_parsers import ParsedOutput, StreamDelta, ToolCall, ToolCallDelta
from loraplex.server.interface import Chunk, CompletionDelta
from loraplex.server.openai.protocol_responses import ResponsesRequest
from loraplex.server.openai.serving_responses import _Builder
from loraplex.server.settings import ServerSettings
from tests.server.test_app_unit import FakeEngine
from tests.server.test_body_limit import live_server

TOOLS = [{"type": "function", "name": "get_weather", "description": "Forecast",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
         {"type": "function", "name": "get_time", "parameters": {"type": "object"}}]
CALLS_SCRIPT = ["Let me check.", "\n", 'CALL get_weather {"city": "Paris"}', "\n",
                "CALL get_time {}"]


class ScriptedEngine(FakeEngine):
    """The fake engine, or with a script (`queue`'s next, else `script`) its text pieces, one
    chunk each; with `fail`, that exception after the first piece."""

    script: list[str] | None = None
    queue: list[list[str]] = []  # scripts for the next requests, one each, before `script`
    fail: Exception | None = None

    async def generate(self, req):
        script = self.queue.pop(0) if self.queue else self.script
        if script is None:
            async for chunk in super().generate(req):
                yield chunk
            return
        self.requests.append(req)
        for i, piece in enumerate(script):
            if self.fail is not None and i == 1:
                raise self.fail
            last = i == len(script) - 1
            yield Chunk([CompletionDelta(0, piece, [i], finish_reason="stop" if last else None)],
                        len(req.prompt_token_ids), last)


class FakeTools:
    """Stands in for the chat side's tool parser: a piece `CALL name {json}` is a call (sent
    as an id+name piece and two argument pieces, as vLLM's parsers stream); the rest is text."""

    def parse(self, text: str) -> ParsedOutput:
        head, *calls = text.split("CALL ")
        return ParsedOutput(head or None, [
            ToolCall(f"call_{i}", *c.strip().split(" ", 1)) for i, c in enumerate(calls)])

    def stream(self):
        class Stream:
            n = 0

            def feed(self, text, token_ids=(), finished=False):
                if not text.startswith("CALL "):
                    return StreamDelta(content=text) if text else None
                name, args = text[5:].split(" ", 1)
                self.n += 1
                return StreamDelta(tool_calls=[
                    ToolCallDelta(self.n - 1, f"call_{self.n - 1}", name),
                    ToolCallDelta(self.n - 1, arguments=args[:4]),
                    ToolCallDelta(self.n - 1, arguments=args[4:])])

        return Stream()


@pytest.fixture
def app(tmp_path, toy_model_dir, one_step_lora):
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", str(tmp_path / "art"))
    registry.register_base("toy", toy_model_dir)
    registry.push(one_step_lora, "upper", base="toy")
    settings = ServerSettings(home=tmp_path, model=toy_model_dir, served_model_name="toy",
                              api_keys=["k1"], max_queue=4, max_lora_rank=8)
    engine = ScriptedEngine()
    return create_app(settings, engine, registry=registry), engine


@pytest.fixture
def client(app):
    with TestClient(app[0]) as c:
        c.headers["Authorization"] = "Bearer k1"
        yield c, app[1]


def with_tools(app) -> None:
    app.state.loraplex.serving.responses.tool_session = lambda req, version, sampling: FakeTools()


def create(client, **body):
    body.setdefault("input", "hi")
    return client.post("/v1/responses", json={"model": "toy", **body})


def stream_events(client, **body) -> list[dict]:
    """The SSE stream's events, checking OpenAI's framing: `event: <type>` then `data:`,
    numbered from 0, and no `[DONE]`."""
    body.setdefault("input", "hi")
    with client.stream("POST", "/v1/responses",
                       json={"model": "toy", "stream": True, **body}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        blocks = r.read().decode().strip().split("\n\n")
    events = []
    for block in blocks:
        kind, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert kind == f"event: {event['type']}"
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def same_output(a: list[dict], b: list[dict]) -> bool:
    strip = lambda items: [{k: v for k, v in i.items() if k != "id"} for i in items]  # noqa: E731
    return strip(a) == strip(b)


def summary(item) -> tuple:
    """An SDK output item, less its id and what only the stream helper adds (`parsed`)."""
    if item.type == "message":
        return item.type, item.status, [(c.type, c.text) for c in item.content]
    return item.type, item.status, item.call_id, item.name, item.arguments


def test_text_response_is_an_openai_response(client):
    client_, engine = client
    r = create(client_, instructions="be brief", metadata={"k": "v"}, temperature=0.5)
    assert r.status_code == 200, r.text
    body = r.json()
    resp = Response.model_validate(body)  # the SDK's own model, validated (not just built)
    assert resp.status == "completed" and resp.id.startswith("resp_")
    assert resp.output_text.startswith("echo:base:") and resp.output[0].role == "assistant"
    u = resp.usage
    assert u.total_tokens == u.input_tokens + u.output_tokens and u.output_tokens > 0
    assert body["store"] is False and body["temperature"] == 0.5 and body["metadata"] == {"k": "v"}
    assert engine.requests[-1].sampling.stop_token_ids  # the template's end-of-turn token
    r = create(client_, model="upper")
    assert r.json()["output"][0]["content"][0]["text"].startswith("echo:upper@1:")


def test_input_items_render_as_the_same_chat(client):
    """instructions + message / function_call / function_call_output items reach the engine
    as exactly the prompt of the equivalent chat request (tools included)."""
    client_, engine = client
    args = '{"city": "Paris"}'
    items = [
        {"role": "developer", "content": "answer in French"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "checking", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": args},
        {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "noon"}]},
    ]
    r = create(client_, instructions="be brief", input=items, tools=TOOLS, tool_choice="none")
    assert r.status_code == 200, r.text
    responses_prompt = engine.requests[-1].prompt_token_ids
    calls = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": args}},
             {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]
    messages = [{"role": "system", "content": "be brief"},
                {"role": "developer", "content": "answer in French"},
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "checking", "tool_calls": calls},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                {"role": "tool", "tool_call_id": "c2", "content": "noon"}]
    chat_tools = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}}
                  for t in TOOLS]
    r = client_.post("/v1/chat/completions", json={"model": "toy", "messages": messages,
                                                   "tools": chat_tools, "tool_choice": "none"})
    assert r.status_code == 200, r.text
    assert engine.requests[-1].prompt_token_ids == responses_prompt


def test_max_output_tokens_cut_is_incomplete(client):
    body = create(client[0], max_output_tokens=4).json()
    assert body["status"] == "incomplete" and body["incomplete_details"] == {
        "reason": "max_output_tokens"}
    assert body["output"][0]["status"] == "incomplete"
    assert body["output"][0]["content"][0]["text"] == "echo" and body["usage"]["output_tokens"] == 4


@pytest.mark.parametrize("body, param", [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"store": True}, "store"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": TOOLS + [{"type": "file_search", "vector_store_ids": []}]}, "tools[2].type"),
    ({"tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name"),
    ({"tool_choice": {"type": "web_search_preview"}, "tools": TOOLS}, "tool_choice"),
    ({"tool_choice": {"type": "function", "name": "nope"}, "tools": TOOLS}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"n": 2}, "n"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"max_output_tokens": 10_000}, "max_output_tokens"),
    ({"input": []}, "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0]"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input[0].type"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
])
def test_refused_with_400_naming_the_param(client, body, param):
    client_, engine = client
    r = create(client_, **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    if param in ("previous_response_id", "store", "conversation", "background"):
        assert "stateless" in err["message"]
    assert not engine.requests


def test_accepted_and_ignored(client):
    """What clients send by default: store false, reasoning, include of other things, a
    truncation mode, service_tier, prompt_cache_key."""
    r = create(client[0], store=False, reasoning={"effort": "low"}, truncation="auto",
               include=["reasoning.encrypted_content"], service_tier="auto",
               prompt_cache_key="k", user="u1", parallel_tool_calls=False)
    assert r.status_code == 200, r.text
    assert r.json()["reasoning"] == {"effort": "low"} and r.json()["parallel_tool_calls"] is False


def test_structured_output_and_logprobs_reach_the_engine(client):
    client_, engine = client
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = create(client_, text={"format": {"type": "json_schema", "name": "x", "schema": schema,
                                            "strict": True}}).json()
    assert engine.requests[-1].sampling.json_schema == schema
    assert body["text"]["format"]["schema"] == schema
    create(client_, text={"format": {"type": "json_object"}})
    assert engine.requests[-1].sampling.json_object
    create(client_, include=["message.output_text.logprobs"], top_logprobs=2)
    assert engine.requests[-1].sampling.logprobs == 2
    create(client_)
    assert engine.requests[-1].sampling.logprobs is None


def test_stream_events_in_order_and_equal_to_the_body(client):
    client_, _ = client
    events = stream_events(client_)
    types = [e["type"] for e in events]
    n = len("echo:base:") + 2  # the fake's reply, one character per chunk
    assert types == (["response.created", "response.in_progress", "response.output_item.added",
                      "response.content_part.added"] + ["response.output_text.delta"] * n
                     + ["response.output_text.done", "response.content_part.done",
                        "response.output_item.done", "response.completed"])
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    item_id = events[2]["item"]["id"]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert {(e["item_id"], e["output_index"], e["content_index"]) for e in deltas} == {(item_id, 0, 0)}
    text = "".join(e["delta"] for e in deltas)
    assert events[-4]["text"] == text
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["usage"]["output_tokens"] == n
    assert final["id"] == events[0]["response"]["id"]
    assert same_output(final["output"], create(client_).json()["output"])


def test_tool_calls_become_function_call_items(client, app):
    """With a parser (here a fake; the chat side's is wired in later) calls are function_call
    items after the text message, streamed as arguments deltas, equal to the JSON body."""
    client_, engine = client
    with_tools(app[0])
    engine.script = CALLS_SCRIPT
    body = create(client_, tools=TOOLS).json()
    resp = Response.model_validate(body)
    assert [o.type for o in resp.output] == ["message", "function_call", "function_call"]
    assert resp.output_text == "Let me check.\n"  # what the parser left as text
    assert [(o.call_id, o.name, o.arguments) for o in resp.output[1:]] == [
        ("call_0", "get_weather", '{"city": "Paris"}'), ("call_1", "get_time", "{}")]
    assert body["tools"][0]["name"] == "get_weather" and body["tool_choice"] == "auto"
    events = stream_events(client_, tools=TOOLS)
    types = [e["type"] for e in events]
    assert types[2:] == [
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    assert events[9]["item"]["arguments"] == "" and events[9]["output_index"] == 1
    assert events[12]["arguments"] == '{"city": "Paris"}'
    assert same_output(events[-1]["response"]["output"], body["output"])


def test_tools_go_through_the_chat_sides_handling(client):
    """Without a tool format for the model, tools are chat's 400 (tool_choice none: text)."""
    client_, engine = client
    r = create(client_, tools=TOOLS)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text
    assert "tool format" in r.json()["error"]["message"] and not engine.requests
    r = create(client_, tools=TOOLS, tool_choice="none")
    assert r.status_code == 200 and r.json()["output"][0]["type"] == "message"


def test_real_parser_hermes_calls(tmp_path, toy_model_dir):
    """The chat side's parser (vLLM's hermes) behind the hook: its calls, streamed or not,
    are the same function_call items."""
    pytest.importorskip("vllm")
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", str(tmp_path / "art"))
    registry.register_base("toy", toy_model_dir)
    settings = ServerSettings(home=tmp_path, model=toy_model_dir, served_model_name="toy",
                              tool_format="hermes")
    engine = ScriptedEngine()
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    engine.script = ["Sure.", "\n", *call[:30], call[30:]]  # the marker split across pieces
    with TestClient(create_app(settings, engine, registry=registry)) as c:
        body = create(c, input="weather?", tools=TOOLS).json()
        resp = Response.model_validate(body)
        calls = [o for o in resp.output if o.type == "function_call"]
        assert [(o.name, json.loads(o.arguments)) for o in calls] == [
            ("get_weather", {"city": "Paris"})]
        assert "<tool_call>" not in resp.output_text
        events = stream_events(c, input="weather?", tools=TOOLS)
        final = events[-1]["response"]["output"]
        assert [(o["type"], o.get("name")) for o in final] == [(o.type, getattr(o, "name", None))
                                                               for o in resp.output]
        assert json.loads(final[-1]["arguments"]) == {"city": "Paris"}
        assert "response.function_call_arguments.delta" in {e["type"] for e in events}


def test_builder_tool_call_pieces():
    """The conversion the chat side's parser feeds, by hand: blank text before a call is
    dropped, text after a call opens a new message, a call's pieces join."""
    b = _Builder(ResponsesRequest(model="toy", input="x"), "resp_1", 0)
    b.start()
    assert b.text("\n ") == []  # held: it may only precede a call
    evs = b.tool_call(0, "call_a", "f", '{"x"')
    assert [e["type"] for e in evs] == ["response.output_item.added",
                                        "response.function_call_arguments.delta"]
    b.tool_call(0, None, None, ": 1}")
    evs = b.text("done")
    assert [e["type"] for e in evs][:3] == ["response.function_call_arguments.done",
                                             "response.output_item.done",
                                             "response.output_item.added"]
    b.finish("stop", 3, 5)
    out = b.response()["output"]
    assert [(o["type"], o["status"]) for o in out] == [("function_call", "completed"),
                                                        ("message", "completed")]
    assert out[0]["arguments"] == '{"x": 1}' and out[0]["call_id"] == "call_a"
    assert out[1]["content"][0]["text"] == "done"
    # an answer of blank text is still a message, kept as generated
    b = _Builder(ResponsesRequest(model="toy", input="x"), "resp_2", 0)
    b.text(" ")
    b.finish("stop", 1, 1)
    assert Response.model_validate(b.response()).output_text == " "


@pytest.mark.parametrize("exc, status", [(BadRequest("bad grammar", param="text"), "400"),
                                         (RuntimeError("engine died"), "500")])
def test_failure_mid_stream_ends_with_response_failed(client, exc, status):
    client_, engine = client
    engine.script, engine.fail = ["a", "b"], exc
    events = stream_events(client_)
    assert [e["type"] for e in events[-2:]] == ["response.output_text.delta", "response.failed"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["message"]
    assert failed["output"][0]["content"][0]["text"] == "a"  # what was sent before it broke
    assert "engine died" not in json.dumps(events)  # internals stay in the log
    metrics = client_.get("/metrics").text
    assert f'endpoint="responses",status="{status}"' in metrics


def test_openai_sdk(app):
    """The official SDK over real HTTP: create, stream=True, the .stream() helper, tool-call
    items and a refusal as BadRequestError."""
    application, engine = app
    with live_server(application) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="k1", max_retries=0)
        r = c.responses.create(model="toy", input="hi")
        assert r.output_text.startswith("echo:base:") and r.usage.output_tokens > 0
        events = list(c.responses.create(model="toy", input="hi", stream=True))
        assert events[0].type == "response.created" and events[-1].type == "response.completed"
        assert events[-1].response.output_text == r.output_text
        with c.responses.stream(model="toy", input="hi") as s:
            text = "".join(e.delta for e in s if e.type == "response.output_text.delta")
            assert s.get_final_response().output_text == text == r.output_text
        with pytest.raises(openai.BadRequestError) as e:
            c.responses.create(model="toy", input="hi", previous_response_id="resp_1")
        assert e.value.body["param"] == "previous_response_id"

        with_tools(application)
        engine.script = CALLS_SCRIPT
        r = c.responses.create(model="toy", input="weather?", tools=TOOLS)
        assert [o.name for o in r.output if o.type == "function_call"] == ["get_weather", "get_time"]
        with c.responses.stream(model="toy", input="weather?", tools=TOOLS) as s:
            final = s.get_final_response()
        assert [summary(o) for o in final.output] == [summary(o) for o in r.output]


def test_langchain_chat_openai_responses_api(app):
    """LangChain's ChatOpenAI(use_responses_api=True): invoke, stream, tool calls."""
    lc = pytest.importorskip("langchain_openai")
    application, engine = app
    with live_server(application) as url:
        chat = lc.ChatOpenAI(model="toy", base_url=url + "/v1", api_key="k1",
                             use_responses_api=True, max_retries=0, temperature=0)
        assert chat.invoke("hi").text.startswith("echo:base:")
        assert "".join(ch.text for ch in chat.stream("hi")).startswith("echo:base:")
        with_tools(application)
        engine.script = CALLS_SCRIPT
        msg = chat.bind_tools([{"type": "function", "function": {k: v for k, v in t.items()
                                                                 if k != "type"}}
                               for t in TOOLS]).invoke("weather?")
        assert [(t["name"], t["args"]) for t in msg.tool_calls] == [
            ("get_weather", {"city": "Paris"}), ("get_time", {})]


def test_openai_agents_sdk_tool_round_trip(app):
    """The Agents SDK: the model calls a function tool, the SDK runs it and sends the call
    and its output back as input items, the model answers."""
    agents = pytest.importorskip("agents")
    application, engine = app
    agents.set_tracing_disabled(True)  # traces would go to OpenAI's servers

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Forecast for a city."""
        return f"sunny in {city}"

    with live_server(application) as url:
        with_tools(application)
        engine.queue = [['CALL get_weather {"city": "Paris"}'], ["It is sunny."]]
        model = agents.OpenAIResponsesModel(
            model="toy", openai_client=openai.AsyncOpenAI(base_url=url + "/v1", api_key="k1",
                                                          max_retries=0))
        agent = agents.Agent(name="a", instructions="be brief", model=model, tools=[get_weather])
        result = agents.Runner.run_sync(agent, "weather in Paris?")
    assert result.final_output == "It is sunny."
    tok = application.state.loraplex.serving.responses.tokenizer
    assert "sunny in Paris" in tok.decode(engine.requests[-1].prompt_token_ids)


@pytest.mark.engine
def test_real_engine_responses_equal_chat(served):
    """The toy base and an adapter through the real engine: create and stream give the text
    chat completions gives for the same prompt at temperature 0."""
    c = served.client()
    q = "cat dog bird"
    for model in ("toy", "upper"):
        want = c.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                         max_tokens=16, temperature=0).choices[0].message.content
        r = c.responses.create(model=model, input=q, max_output_tokens=16, temperature=0)
        assert r.output_text == want and r.usage.output_tokens > 0
        events = list(c.responses.create(model=model, input=q, max_output_tokens=16,
                                         temperature=0, stream=True))
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == want
        assert events[-1].type in ("response.completed", "response.incomplete")
        assert events[-1].response.output_text == want
