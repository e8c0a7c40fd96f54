"""The trainer learns tool use: tool calls are labelled as the template writes them, tool results
and tool definitions never are; OpenAI and ShareGPT (LLaMA-Factory) tool rows parse, malformed
ones are rejected with a reason; the hermes built-in (Qwen2.5's template) renders like
transformers' `apply_chat_template(tools=...)`; and a short run on the bundled toy tool data
gives an adapter whose greedy answer to a held-out question is a hermes tool call.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import pytest

from loraplex.adapters import chat
from loraplex.adapters.chat import IGNORE_INDEX, builtin_template, render, render_for_training
from loraplex.adapters.errors import BadRequest
from loraplex.trainer.formats import RowError, parse_example, parse_row, read_rows

from .conftest import DATA

HERMES = builtin_template("hermes")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                    "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]  # as the bundled data offers them


def user(c: str) -> dict:
    return {"role": "user", "content": c}


def call(name: str, args: dict, cid: str = "call_0") -> dict:
    return {"id": cid, "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)}}


def calls(*cs: dict, content: str | None = None) -> dict:
    return {"role": "assistant", "content": content, "tool_calls": list(cs)}


def result(content: str, cid: str = "call_0") -> dict:
    return {"role": "tool", "tool_call_id": cid, "content": content}


def answer(c: str) -> dict:
    return {"role": "assistant", "content": c}


def hermes_call(name: str, args: dict) -> str:
    """What the hermes template writes for one call (and what vLLM's hermes parser reads)."""
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(args)}}}\n</tool_call>'


CALL_ONLY = [user("What is the weather in Oslo?"), calls(call("get_weather", {"city": "Oslo"}))]
FOLLOW_UP = CALL_ONLY + [result('{"city": "Oslo", "weather": "cold"}'), answer("It is cold.")]
PARALLEL = [{"role": "system", "content": "Be brief."},
            user("Weather in Rome, and 2 plus 3?"),
            calls(call("get_weather", {"city": "Rome"}, "c1"), call("add", {"a": 2, "b": 3}, "c2"),
                  content="Let me check both."),
            result('{"weather": "warm"}', "c1"), result("5", "c2"),
            answer("It is warm, and 2 plus 3 is 5."),
            user("And in Lima?"), calls(call("get_weather", {"city": "Lima"}, "c3")),
            result('{"weather": "cold"}', "c3"), answer("It is cold.")]
CONVERSATIONS = {"call_only": CALL_ONLY, "follow_up": FOLLOW_UP, "parallel_multi_turn": PARALLEL}


def labelled_runs(tok, t) -> list[str]:
    """The decoded text of each run of labelled tokens."""
    runs, cur = [], []
    for i, lab in zip(t.token_ids, t.labels):
        if lab != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


# -- labels ----------------------------------------------------------------------------------

def test_call_only_turn_is_labelled_from_the_prompt_end_to_the_end_of_turn(toy_tok):
    t = render_for_training(HERMES, CALL_ONLY, toy_tok, tools=TOOLS)
    assert labelled_runs(toy_tok, t) == [
        hermes_call("get_weather", {"city": "Oslo"}) + "<|im_end|>"]
    # The ids before the labels are exactly the prompt the server sends (with the tools).
    served = render(HERMES, CALL_ONLY[:1], toy_tok, tools=TOOLS).token_ids
    assert t.token_ids[:len(served)] == served and t.cuts == 0
    assert t.labels[len(served) - 1] == IGNORE_INDEX and t.labels[len(served)] != IGNORE_INDEX
    assert t.text.startswith(render(HERMES, CALL_ONLY[:1], toy_tok, tools=TOOLS).text)
    assert '"name": "add"' in t.text  # the tool definitions are in the prompt ...
    assert all('"description"' not in run for run in labelled_runs(toy_tok, t))  # ... not learned


def test_follow_up_labels_the_call_and_the_answer_never_the_tool_result(toy_tok):
    t = render_for_training(HERMES, FOLLOW_UP, toy_tok, tools=TOOLS)
    runs = labelled_runs(toy_tok, t)
    assert runs == [hermes_call("get_weather", {"city": "Oslo"}) + "<|im_end|>",
                    "It is cold.<|im_end|>"]
    assert "<tool_response>" in t.text and not any("tool_response" in r or "weather\": \"cold"
                                                   in r for r in runs)
    # The second answer starts where the served prompt for the conversation so far ends.
    served = render(HERMES, FOLLOW_UP[:3], toy_tok, tools=TOOLS).token_ids
    assert t.token_ids[:len(served)] == served
    assert t.labels[len(served) - 1] == IGNORE_INDEX and t.labels[len(served)] != IGNORE_INDEX
    everything = render_for_training(HERMES, FOLLOW_UP, toy_tok, train_on_inputs=True,
                                     tools=TOOLS)
    assert everything.labels == everything.token_ids == t.token_ids


def test_content_and_parallel_calls_are_one_labelled_turn(toy_tok):
    t = render_for_training(HERMES, PARALLEL, toy_tok, tools=TOOLS)
    assert labelled_runs(toy_tok, t) == [
        "Let me check both.\n" + hermes_call("get_weather", {"city": "Rome"}) + "\n"
        + hermes_call("add", {"a": 2, "b": 3}) + "<|im_end|>",
        "It is warm, and 2 plus 3 is 5.<|im_end|>",
        hermes_call("get_weather", {"city": "Lima"}) + "<|im_end|>",
        "It is cold.<|im_end|>"]
    assert [t.text[s:e] for s, e in t.spans] == [
        r.replace("<|im_end|>", "") + "<|im_end|>" for r in labelled_runs(toy_tok, t)]


def test_tools_reach_every_render(toy_tok):
    """Without the tools the prompt (and so the generation-prompt prefix) differs: the spans
    are found only because the same tools go into every render."""
    with_tools = render_for_training(HERMES, FOLLOW_UP, toy_tok, tools=TOOLS)
    without = render_for_training(HERMES, FOLLOW_UP, toy_tok)
    assert "<tools>" in with_tools.text and "<tools>" not in without.text
    assert labelled_runs(toy_tok, with_tools) == labelled_runs(toy_tok, without)


def test_templates_that_drop_calls_or_tools_are_refused(toy_tok):
    chatml = builtin_template("chatml")  # writes only the content: the calls would be lost
    with pytest.raises(BadRequest, match=r"does not write messages\[1\]\.tool_calls\[0\] "
                                         r"\(get_weather\)"):
        render_for_training(chatml, CALL_ONLY, toy_tok)
    with pytest.raises(BadRequest, match="does not read `tools`"):
        render_for_training(chatml, [user("hi"), answer("hello")], toy_tok, tools=TOOLS)
    # A template whose generation prompt is not a prefix of the conversation at a call-only
    # turn: the answer's start cannot be found without markers.
    moving = HERMES.replace("{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}",
                            "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant:\\n' }}")
    assert moving != HERMES
    with pytest.raises(BadRequest, match=r"messages\[1\] \(an assistant turn that only calls "
                                         r"tools\).*generation"):
        render_for_training(moving, CALL_ONLY, toy_tok, tools=TOOLS)


def test_plain_rows_keep_their_labels(toy_tok):
    """A turn without tool calls: the span rule is the one it always was."""
    msgs = [user("Name a fruit."), answer("plum")]
    for name in ("chatml", "hermes"):
        t = render_for_training(builtin_template(name), msgs, toy_tok)
        assert labelled_runs(toy_tok, t) == ["plum<|im_end|>"]
    t = render_for_training(HERMES, msgs, toy_tok, tools=TOOLS)
    assert labelled_runs(toy_tok, t) == ["plum<|im_end|>"] and "<tools>" in t.text


# -- formats -----------------------------------------------------------------------------------

def test_openai_tool_rows_parse():
    row = {"tools": TOOLS, "messages": FOLLOW_UP}
    kind, msgs, tools = parse_example(row)
    assert kind == "openai" and tools == TOOLS
    assert msgs[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_0", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}
    assert msgs[2] == {"role": "tool", "content": '{"city": "Oslo", "weather": "cold"}',
                       "tool_call_id": "call_0"}
    assert parse_row(row) == ("openai", msgs)
    # Content parts, arguments already an object, a bare function schema as a tool, developer.
    kind, msgs, tools = parse_example({"tools": [WEATHER["function"]], "messages": [
        {"role": "developer", "content": "S"}, user("q"),
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."}],
         "tool_calls": [{"id": "x", "function": {"name": "get_weather",
                                                 "arguments": {"city": "Rome"}}}]}]})
    assert tools == [WEATHER] and msgs[2]["content"] == "Checking."
    assert msgs[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Rome"}


def test_sharegpt_function_call_observation_and_tools_column():
    row = {"system": "Be brief.", "tools": json.dumps([WEATHER["function"], ADD["function"]]),
           "conversations": [
               {"from": "human", "value": "What is the weather in Oslo?"},
               {"from": "function_call",
                "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
               {"from": "observation", "value": '{"weather": "cold"}'},
               {"from": "gpt", "value": "It is cold."},
               {"from": "human", "value": "2 plus 3 and 1 plus 1?"},
               {"from": "function_call", "value": json.dumps([
                   {"name": "add", "arguments": json.dumps({"a": 2, "b": 3})},
                   {"name": "add", "arguments": {"a": 1, "b": 1}}])},
               {"from": "observation", "value": "5"},
               {"from": "observation", "value": "2"},
               {"from": "gpt", "value": "5 and 2."}]}
    kind, msgs, tools = parse_example(row)
    assert kind == "sharegpt" and tools == TOOLS
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "assistant",
                                         "user", "assistant", "tool", "tool", "assistant"]
    assert msgs[2]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                    "arguments": {"city": "Oslo"}}
    second = msgs[6]["tool_calls"]
    assert [c["function"]["arguments"] for c in second] == [{"a": 2, "b": 3}, {"a": 1, "b": 1}]
    assert [msgs[7]["tool_call_id"], msgs[8]["tool_call_id"]] == [c["id"] for c in second]


def test_sharegpt_and_openai_forms_train_the_same(toy_tok):
    openai = {"tools": TOOLS, "messages": FOLLOW_UP}
    sharegpt = {"tools": TOOLS, "conversations": [
        {"from": "human", "value": "What is the weather in Oslo?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'},
        {"from": "observation", "value": '{"city": "Oslo", "weather": "cold"}'},
        {"from": "gpt", "value": "It is cold."}]}
    out = []
    for row in (openai, sharegpt):
        _, msgs, tools = parse_example(row)
        t = render_for_training(HERMES, msgs, toy_tok, tools=tools)
        out.append((t.token_ids, t.labels))
    assert out[0] == out[1]


BAD_ROWS = {
    "function_call not JSON": (
        {"conversations": [{"from": "human", "value": "q"},
                           {"from": "function_call", "value": "get_weather(Oslo)"}]},
        "bad_tool_call", r"conversations\[1\]\.value \(function_call\) is not JSON"),
    "function_call without a name": (
        {"conversations": [{"from": "human", "value": "q"},
                           {"from": "function_call", "value": "{}"}]},
        "bad_tool_call", "non-empty name"),
    "arguments not an object": (
        {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call",
                           "value": '{"name": "add", "arguments": [1, 2]}'}]},
        "bad_tool_call", "arguments of 'add' must be a JSON object"),
    "arguments not JSON": (
        {"messages": [user("q"), calls({"id": "c", "type": "function", "function": {
            "name": "add", "arguments": "{a: 1"}})]},
        "bad_tool_call", "arguments of 'add' are not JSON"),
    "observation without a call": (
        {"conversations": [{"from": "human", "value": "q"},
                           {"from": "observation", "value": "5"}, {"from": "gpt", "value": "x"}]},
        "bad_tool_call", "no function_call before it"),
    "tool message without tool_call_id": (
        {"messages": [user("q"), calls(call("add", {"a": 1})),
                      {"role": "tool", "content": "1"}, answer("1")]},
        "bad_tool_call", "needs tool_call_id"),
    "tool_call_id answering nothing": (
        {"messages": [user("q"), calls(call("add", {"a": 1})), result("1", "other"),
                      answer("1")]},
        "bad_tool_call", "'other' answers no unanswered tool call"),
    "tool message after a user turn": (
        {"messages": [user("q"), result("1"), answer("1")]},
        "bad_tool_call", "answers no unanswered tool call"),
    "call without an id": (
        {"messages": [user("q"), calls({"type": "function",
                                        "function": {"name": "add", "arguments": "{}"}})]},
        "bad_tool_call", "needs an id"),
    "calls an undefined tool": (
        {"tools": [WEATHER], "messages": [user("q"), calls(call("add", {"a": 1}))]},
        "bad_tool_call", "calls 'add', which the row's tools do not define"),
    "ends with a tool result": (
        {"messages": [user("q"), calls(call("add", {"a": 1})), result("1")]},
        "bad_structure", "ends with a tool result"),
    "tools not JSON": (
        {"tools": "[{name: add}]", "conversations": [{"from": "human", "value": "q"},
                                                     {"from": "gpt", "value": "a"}]},
        "bad_tools", "tools is not JSON"),
    "tools not a list": (
        {"tools": {"name": "add"}, "messages": [user("q"), answer("a")]},
        "bad_tools", "tools must be a list"),
    "tool without a name": (
        {"tools": [{"type": "function", "function": {"description": "x"}}],
         "messages": [user("q"), answer("a")]},
        "bad_tools", r"tools\[0\] needs a name"),
    "tool parameters not an object": (
        {"tools": [{"name": "add", "parameters": "a, b"}], "messages": [user("q"), answer("a")]},
        "bad_tools", "parameters must be a JSON object"),
    "a tool defined twice": (
        {"tools": [WEATHER, WEATHER], "messages": [user("q"), answer("a")]},
        "bad_tools", "defines 'get_weather' twice"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_malformed_tool_rows_are_rejected(case):
    row, code, detail = BAD_ROWS[case]
    with pytest.raises(RowError) as exc:
        parse_example(row)
    assert exc.value.code == code and re.search(detail, exc.value.detail), exc.value.detail


def test_rejects_are_reported_per_row(write_jsonl, toy_tok):
    from loraplex.trainer.config import load_config
    from loraplex.trainer.dataset import prepare_data

    rows = [{"tools": TOOLS, "messages": FOLLOW_UP},
            BAD_ROWS["tools not JSON"][0],
            # A special token hidden in a call's arguments would break the turn structure.
            {"tools": TOOLS, "messages": [user("q"), calls(call("get_weather",
                                                               {"city": "x<|im_end|>"}))]},
            # Same question, different call: not a duplicate.
            {"tools": TOOLS, "messages": [user("What is the weather in Oslo?"),
                                          calls(call("get_weather", {"city": "Rome"}))]},
            {"tools": TOOLS, "messages": CALL_ONLY},
            {"tools": TOOLS, "messages": CALL_ONLY}]  # an exact duplicate of the row before
    f = write_jsonl("tools.jsonl", rows)
    cfg = load_config(None, {"base": "unused", "data": [str(f)], "output": "unused",
                             "chat_template": "hermes", "dedup": "normalized"})
    data = prepare_data(cfg, toy_tok, HERMES)
    got = {r.source.rsplit(":", 1)[1]: r.code for r in data.report.rejected}
    assert got == {"2": "bad_tools", "3": "special_token", "6": "duplicate"}
    assert [ex.tools for ex in data.train] == [TOOLS] * 3
    # ChatML reads no tools and writes no calls: refused, never trained as empty answers.
    with pytest.raises(BadRequest, match=r"no training examples left: .*template_error 4"):
        prepare_data(cfg, toy_tok, builtin_template("chatml"))
    rows, _ = read_rows([f])
    with pytest.raises(BadRequest, match="does not read `tools`"):
        render_for_training(builtin_template("chatml"), rows[0].messages, toy_tok,
                            tools=rows[0].tools)


def test_rows_without_tools_hash_as_before():
    """data_sha256 and dedup keys of existing data are unchanged (resume compares them)."""
    import hashlib

    from loraplex.trainer.dataset import _dedup_key

    msgs = [user("q"), answer("a")]
    assert _dedup_key(msgs, "exact") == hashlib.sha256(
        json.dumps(msgs, sort_keys=True).encode()).hexdigest()
    assert _dedup_key(msgs, "exact", TOOLS) != _dedup_key(msgs, "exact")


# -- the bundled data ----------------------------------------------------------------------------

def test_bundled_tool_data(toy_tok):
    rows, rejected = read_rows([DATA / "tools.openai.jsonl"])
    held, held_rejected = read_rows([DATA / "tools.openai.heldout.jsonl"])
    assert not rejected and not held_rejected and len(rows) >= 80 and len(held) >= 16
    assert all(r.tools == TOOLS for r in rows + held)

    def question(r):
        return r.messages[0]["content"]

    def towns(r):
        return frozenset(c["function"]["arguments"]["city"] for c in r.messages[1]["tool_calls"]
                         if c["function"]["name"] == "get_weather")

    # Held-out questions never occur in training; every held-out city is asked in training, and
    # two held-out towns never together.
    assert not {question(r) for r in held} & {question(r) for r in rows}
    cities = set().union(*map(towns, rows))
    assert set().union(*map(towns, held)) <= cities
    two = [r for r in rows + held if len(r.messages[1]["tool_calls"]) > 1]
    assert len(two) >= 24 and all(len(towns(r)) == 2 for r in two)  # parallel calls
    assert not {towns(r) for r in held if len(towns(r)) == 2} & {towns(r) for r in rows}
    # Half of the rows go on after the calls: the tools' results, then the final answer.
    assert 0.3 < sum(len(r.messages) > 2 for r in rows) / len(rows) < 0.7
    for r in rows:  # one result per call
        if len(r.messages) > 2:
            assert len(r.messages) == 3 + len(r.messages[1]["tool_calls"])
    for r in rows[:10]:
        render_for_training(HERMES, r.messages, toy_tok, tools=r.tools)


# -- fidelity: the hermes built-in against transformers, with tools ---------------------------------

# The hermes template with `{% generation %}` around exactly the span loraplex labels: from the
# end of the generation prompt "<|im_start|>assistant\n" to the end of <|im_end|>. It renders the
# same text (checked), so HF's assistant mask is the reference for our labels.
HERMES_MARKED = HERMES[:HERMES.index("{%- for message in messages %}")] + """\
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" and not message.tool_calls %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- generation %}{{- message.content + '<|im_end|>' }}{%- endgeneration %}
        {{- '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- generation %}
        {%- if message.content %}
            {{- message.content + '\\n' }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {%- if not loop.first %}
                {{- '\\n' }}
            {%- endif %}
            {{- '<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


@pytest.fixture(scope="module")
def hf_tokenizers(request: pytest.FixtureRequest):
    """`get(mechanic)` -> (transformers AutoTokenizer, loraplex ChatTokenizer), as the render
    fidelity suite builds them (tests/fixtures/tokenizers.py)."""
    from transformers import AutoTokenizer

    from tests.fixtures.tokenizers import build_tokenizer_dir, cache_root

    root = cache_root(request.config.cache.mkdir("render-fixtures"))

    @functools.cache
    def get(mechanic: str) -> tuple[Any, Any]:
        d = build_tokenizer_dir(root, mechanic)
        return AutoTokenizer.from_pretrained(d), chat.load_tokenizer(d)

    return get


def _mechanics() -> list[str]:
    from tests.fixtures.tokenizers import MECHANICS

    return list(MECHANICS)


@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("mechanic", _mechanics())
def test_hermes_with_tools_matches_transformers(hf_tokenizers, mechanic, conv):
    from transformers.utils.chat_template_utils import render_jinja_template

    hf, tok = hf_tokenizers(mechanic)
    raw = CONVERSATIONS[conv]
    # What a template sees (vLLM's server and transformers alike): arguments as objects.
    msgs = chat.validate_messages(raw, HERMES)

    def hf_text(tpl: str, m: list, agp: bool) -> str:
        return hf.apply_chat_template(m, tools=TOOLS, chat_template=tpl, tokenize=False,
                                      add_generation_prompt=agp)

    # Serving: every prompt the server would send in this conversation.
    for k in [i for i, m in enumerate(raw) if m["role"] == "assistant"]:
        r = render(HERMES, raw[:k], tok, tools=TOOLS)
        assert r.text == hf_text(HERMES, msgs[:k], True)
        assert r.token_ids == hf.apply_chat_template(
            msgs[:k], tools=TOOLS, chat_template=HERMES, tokenize=True,
            add_generation_prompt=True, return_dict=False)
    # Training: HF's text and whole-text ids; our spans are the marked copy's generation spans
    # and our labels HF's assistant mask.
    text = hf_text(HERMES, msgs, False)
    assert hf_text(HERMES_MARKED, msgs, False) == text
    _, indices = render_jinja_template(conversations=[msgs], tools=TOOLS,
                                       chat_template=HERMES_MARKED,
                                       return_assistant_tokens_mask=True,
                                       add_generation_prompt=False, **hf.special_tokens_map)
    t = render_for_training(HERMES, raw, tok, tools=TOOLS)
    assert t.text == text
    assert [tuple(s) for s in t.spans] == [tuple(s) for s in indices[0]]
    out = hf.apply_chat_template(msgs, tools=TOOLS, chat_template=HERMES_MARKED, tokenize=True,
                                 return_dict=True, return_assistant_tokens_mask=True,
                                 add_generation_prompt=False)
    assert t.cuts == 0
    assert t.token_ids == list(out["input_ids"]) == hf.apply_chat_template(
        msgs, tools=TOOLS, chat_template=HERMES, tokenize=True, return_dict=False)
    assert [int(lab != IGNORE_INDEX) for lab in t.labels] == list(out["assistant_masks"])


def test_hermes_is_qwen25s_template_without_tools(hf_tokenizers):
    """Without tools hermes renders exactly as the Qwen2.5 fixture of the fidelity suite."""
    from tests.fixtures.tokenizers import template

    hf, tok = hf_tokenizers("bytelevel")
    qwen = template("qwen25")
    for msgs in ([user("Name a fruit."), answer("plum")],
                 [{"role": "system", "content": "S"}, user("q"), answer("a"), user("q2")]):
        agp = msgs[-1]["role"] == "user"
        assert render(HERMES, msgs, tok, add_generation_prompt=agp).text == \
            hf.apply_chat_template(msgs, chat_template=qwen, tokenize=False,
                                   add_generation_prompt=agp)


# -- training ------------------------------------------------------------------------------------

def test_run_on_the_bundled_tool_data(toy_model_dir, tmp_path):
    """`loraplex train --chat-template hermes --tool-format hermes` on the bundled tool data:
    every row is kept, the call tokens are trained (the loss on them falls from the base's),
    and the adapter carries the hermes template, its stop token and its tool format."""
    from loraplex.trainer.config import load_config
    from loraplex.trainer.train import run

    cfg = load_config(None, dict(
        base=str(toy_model_dir), data=[str(DATA / "tools.openai.jsonl")],
        output=str(tmp_path / "tools"), chat_template="hermes", tool_format="hermes",
        max_steps=3, batch_size=2, lr=3e-3, lora_r=4, lora_alpha=8, progress_bar=False,
        eval_exact_match=0, log_steps=1))
    result = run(cfg, log=lambda m: None)
    assert result["data"]["kept"] == result["data"]["rows"] == 138
    assert result["data"]["label_tokens"] > 50 * 138  # every call and every final answer
    out = Path(result["output"])
    manifest = json.loads((out / "loraplex.json").read_text())
    assert manifest["chat_template"] == HERMES and manifest["stop_tokens"] == ["<|im_end|>"]
    assert manifest["tool_format"] == "hermes"
    losses = [x for _, x in json.loads((out / "report.json").read_text())["history"]["train_loss"]]
    assert losses[-1] < losses[0]


# -- an adapter that learned tool use -----------------------------------------------------------

# The toy never saw JSON: nearly every token of a hermes call ('<', '_', '{', '"', and letters
# with no space before them) never occurs in its pre-training, their embeddings (tied with the
# output head, which LoRA leaves alone) collapsed together, and the base's loss on a call is ~13
# nats; the scaffold takes a few hundred steps (trainer/data/make_datasets.py).
TOOL_RECIPE = dict(max_steps=600, batch_size=1, lr=3e-3, lora_r=16, lora_alpha=32, seed=0)
HERMES_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)  # vLLM's hermes parser's regex


def parse_hermes(text: str) -> list[dict]:
    """The calls in a model's text, as vLLM's hermes parser reads them ([] if none parses)."""
    try:
        return [json.loads(m.strip()) for m in HERMES_CALL.findall(text)]
    except json.JSONDecodeError:
        return []


def held_out_tool_questions() -> dict[str, list[tuple[list[dict], list[dict], list[tuple]]]]:
    """The bundled held-out tool questions (the rows that end at the call) by kind: "weather"
    (one town, in a phrasing never used for it in training), "two" (two towns never asked about
    together in training: two parallel get_weather calls), "add"; each as (the messages up to
    the question, the tools, the expected calls as [(name, arguments)])."""
    held, _ = read_rows([DATA / "tools.openai.heldout.jsonl"])
    out: dict[str, list] = {"weather": [], "two": [], "add": []}
    for r in held:
        if len(r.messages) != 2:
            continue
        want = [(c["function"]["name"], c["function"]["arguments"])
                for c in r.messages[1]["tool_calls"]]
        kind = "two" if len(want) == 2 else "weather" if want[0][0] == "get_weather" else "add"
        out[kind].append((r.messages[:1], r.tools, want))
    return out


def _tool_adapter_key(toy_model_dir: Path) -> str:
    """Everything that shapes the trained adapter: the data, the recipe, the base, and the
    source of the trainer and the renderer (a change to either trains afresh)."""
    import hashlib
    from importlib import metadata

    import loraplex.trainer

    h = hashlib.sha256(json.dumps([TOOL_RECIPE, toy_model_dir.name] + [
        metadata.version(p) for p in ("torch", "transformers", "peft")]).encode())
    sources = sorted(Path(loraplex.trainer.__file__).parent.glob("*.py")) + [
        Path(chat.__file__), DATA / "tools.openai.jsonl"]
    for p in sources:
        h.update(p.name.encode() + p.read_bytes())
    h.update(HERMES.encode())
    return h.hexdigest()[:16]


def trained_tool_adapter(toy_model_dir: Path, cache_root: Path) -> Path:
    """The adapter TOOL_RECIPE trains on the bundled tool data: trained once and kept under
    pytest's cache dir as the toy base is (tests/server/test_tool_adapter.py serves the same one),
    keyed by `_tool_adapter_key`."""
    from filelock import FileLock

    from loraplex.trainer.config import load_config
    from loraplex.trainer.train import run

    out = cache_root / _tool_adapter_key(toy_model_dir)
    with FileLock(str(cache_root / "train.lock")):
        if not (out / "loraplex.json").exists():
            tmp = cache_root / (out.name + ".partial")
            cfg = load_config(None, dict(
                base=str(toy_model_dir), data=[str(DATA / "tools.openai.jsonl")], output=str(tmp),
                overwrite=True, chat_template="hermes", tool_format="hermes", progress_bar=False,
                eval_exact_match=0, **TOOL_RECIPE))
            run(cfg)
            tmp.rename(out)
    report = json.loads((out / "report.json").read_text())
    losses = [x for _, x in report["history"]["train_loss"]]
    print(f"\ntool adapter {out.name}: {TOOL_RECIPE}; train loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f}; {report.get('metrics', {}).get('train_time_s')} s of training")
    return out


@pytest.fixture(scope="session")
def tool_adapter(toy_model_dir: Path, request: pytest.FixtureRequest) -> Path:
    return trained_tool_adapter(toy_model_dir, Path(request.config.cache.mkdir("tool-adapter")))


def greedy(model, tok, prompts: list[tuple[list[dict], list[dict] | None]],
           max_new_tokens: int = 140) -> list[str]:
    """Greedy answers through the hermes template (the prompt the server sends), one at a time,
    cut at its stop token."""
    import torch

    stops = tok.stop_token_ids(HERMES)
    out = []
    for msgs, tools in prompts:
        ids = render(HERMES, msgs, tok, tools=tools).token_ids
        with torch.no_grad():
            gen = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=stops, pad_token_id=stops[0])
        new = gen[0, len(ids):].tolist()
        out.append(tok.decode(new[:next((k for k, t in enumerate(new) if t in stops), len(new))]))
    return out


@pytest.mark.timeout(5400)  # training: ~4 minutes on an idle 2-core CPU, far more on a busy one
def test_adapter_answers_held_out_questions_with_hermes_tool_calls(toy_model_dir, tool_adapter):
    """Trained on the bundled tool data, the adapter answers every held-out weather question
    with a get_weather call that vLLM's hermes parser reads, and every held-out two-town question
    with two (parallel calls); the base never writes one. Which town it names is printed, not
    asserted: the toy cannot copy from its prompt, and this recipe does not teach it to."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = chat.load_tokenizer(toy_model_dir)
    questions = held_out_tool_questions()
    assert len(questions["weather"]) >= 8 and len(questions["two"]) >= 4
    model = AutoModelForCausalLM.from_pretrained(str(toy_model_dir), dtype=torch.float32)
    base_answers = greedy(model, tok, [(m, t) for qs in questions.values() for m, t, _ in qs])
    model = PeftModel.from_pretrained(model, str(tool_adapter)).eval()
    answers = {kind: greedy(model, tok, [(m, t) for m, t, _ in qs])
               for kind, qs in questions.items()}
    for kind, qs in questions.items():
        calls = [parse_hermes(a) for a in answers[kind]]
        shaped = sum([x.get("name") for x in c] == [w[0] for w in want]
                     for c, (_, _, want) in zip(calls, qs))
        right = sum([(x.get("name"), x.get("arguments")) for x in c] == want
                    for c, (_, _, want) in zip(calls, qs))
        print(f"held-out {kind} questions: {len(qs)}; parsed calls of the right functions and "
              f"count {shaped}, right arguments too {right}")
        for (msgs, _, _), a in zip(qs, answers[kind]):
            print(f"  {msgs[-1]['content']!r} -> {a!r}")
    print(f"base: parsed calls in {sum(bool(parse_hermes(a)) for a in base_answers)} of "
          f"{len(base_answers)} answers")
    assert not any(parse_hermes(a) for a in base_answers)
    for kind, n in (("weather", 1), ("two", 2)):
        for a in answers[kind]:
            c = parse_hermes(a)
            assert [x.get("name") for x in c] == ["get_weather"] * n, a
            assert all(set(x["arguments"]) == {"city"} for x in c), a
