"""Tool-call parsing through vLLM's real parsers (server/engine/tool_parsers.py).

Every format is checked on text the way a model writes it: tokenized by an offline tokenizer
that has the format's markers as added tokens, then streamed back token by token through an
incremental detokenizer (as vLLM's engine hands the server its deltas), with the special-token
setting the module reports. The streamed pieces must reassemble to the non-streamed result.
"""

from __future__ import annotations

import json

import pytest

from loraplex.adapters.errors import BadRequest, ConfigError
from loraplex.server.engine.tool_parsers import (
    TOOL_FORMATS,
    ToolCallParser,
    available_formats,
    parse_constrained,
    tool_choice_schema,
)
from tests.fixtures.tokenizers import build_tokenizer


def _params(required: list[str]) -> dict:
    return {"type": "object", "required": required,
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Forecast",
                                           "parameters": _params(["city"])}},
         {"type": "function", "function": {"name": "get_time", "parameters": _params([])}}]
WEATHER = ("get_weather", {"city": "Zürich", "days": 3})
TIME = ("get_time", {"city": "Tokyo"})
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _py(args: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())


def _qwen_xml(name: str, args: dict) -> str:
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in args.items())
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>\n"


def _hermes(calls) -> str:
    return "".join(f'<tool_call>\n{{"name": "{n}", "arguments": {_json(a)}}}\n</tool_call>\n'
                   for n, a in calls)


def _array(calls, key="arguments") -> str:
    return _json([{"name": n, key: a} for n, a in calls])


# How each format's model writes calls, and whether text may come before them in both the
# streamed and the whole-text parse (llama3_json, granite-20b-fc: only whole-text finds them).
RENDER = {
    "hermes": (_hermes, True),
    "qwen3_json": (_hermes, True),
    "qwen3_coder": (lambda calls: "".join(_qwen_xml(n, a) for n, a in calls), True),
    "granite4": (lambda calls: "".join(f'<tool_call>{{"name": "{n}", "arguments": {_json(a)}}}'
                                       "</tool_call>" for n, a in calls), True),
    "llama3_json": (lambda calls: "; ".join(f'{{"name": "{n}", "parameters": {_json(a)}}}'
                                            for n, a in calls), False),
    "pythonic": (lambda calls: "[" + ", ".join(f"{n}({_py(a)})" for n, a in calls) + "]", False),
    "mistral": (lambda calls: "[TOOL_CALLS]" + _array(calls), True),
    "mistral_v11": (lambda calls: "".join(f"[TOOL_CALLS]{n}[ARGS]{_json(a)}" for n, a in calls),
                    True),
    "granite": (lambda calls: "<|tool_call|>" + _array(calls), True),
    "granite-20b-fc": (lambda calls: "".join(f'<function_call> {{"name": "{n}", "arguments": '
                                             f"{_json(a)}}}\n" for n, a in calls), False),
    "xlam": (_array, False),
}
CASES = sorted(RENDER)

# Markers as real vocabularies have them: Qwen's <tool_call> is a non-special added token,
# Llama's, Mistral's and Granite 3.0's markers are special; <function_call> stays plain text, so
# it arrives split over several tokens. [ARGS] marks a Mistral v11+ tokenizer.
MARKERS = {"<tool_call>": False, "</tool_call>": False, "<|python_tag|>": True,
           "[TOOL_CALLS]": True, "<|tool_call|>": True}


def _tokenizer(markers: dict[str, bool]):
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tok = build_tokenizer("bytelevel")
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in markers.items()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                  eos_token="<|eot_id|>")


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    return {"base": _tokenizer(MARKERS), "v11": _tokenizer({**MARKERS, "[ARGS]": True}),
            "bare": _tokenizer({})}


@pytest.fixture(scope="module")
def parsers(tokenizers) -> dict[str, tuple[ToolCallParser, object]]:
    """Case name -> (parser, the tokenizer the model's text is tokenized with)."""
    out = {fmt: (ToolCallParser(fmt, tokenizers["base"]), tokenizers["base"])
           for fmt in TOOL_FORMATS}
    out["mistral_v11"] = (ToolCallParser("mistral", tokenizers["v11"]), tokenizers["v11"])
    return out


def _stream(case, text: str, tool_choice=None, parallel=True):
    """Feed `text` token by token as vLLM's detokenizer would; reassemble the pieces."""
    parser, tok = case
    skip = parser.decoding(TOOLS, tool_choice, parallel).skip_special_tokens
    stream = parser.stream(TOOLS, tool_choice, parallel)
    ids = tok.encode(text, add_special_tokens=False)
    sent_text, sent_ids, deltas = "", 0, []
    for i in range(len(ids)):
        last = i == len(ids) - 1
        current = tok.decode(ids[:i + 1], skip_special_tokens=skip)
        if current.endswith("\ufffd") and not last:
            continue  # an incomplete UTF-8 character: the detokenizer waits for the rest
        d = stream.feed(current[len(sent_text):], ids[sent_ids:i + 1], finished=last)
        sent_text, sent_ids = current, i + 1
        if d is not None:
            deltas.append(d)
    content = "".join(d.content or "" for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for piece in d.tool_calls:
            call = calls.setdefault(piece.index, {"ids": [], "names": [], "arguments": ""})
            call["ids"] += [piece.id] if piece.id else []
            call["names"] += [piece.name] if piece.name else []
            call["arguments"] += piece.arguments
    return content or None, [calls[i] for i in sorted(calls)]


def _check(case, text: str, expected, tool_choice=None, content=None, parallel=True):
    """parse() finds `expected`; the stream reassembles to exactly the same calls."""
    parsed = case[0].parse(text, TOOLS, tool_choice, parallel)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == \
        [(n, a) for n, a in expected]
    assert len({c.id for c in parsed.tool_calls}) == len(expected)
    assert (parsed.content or "").strip() == (content or "").strip()
    streamed_content, streamed = _stream(case, text, tool_choice, parallel)
    assert [(c["names"], c["arguments"]) for c in streamed] == \
        [([c.name], c.arguments) for c in parsed.tool_calls]
    assert all(len(c["ids"]) == 1 for c in streamed)  # the id comes once, on the first piece
    assert (streamed_content or "").strip() == (content or "").strip()
    return parsed


# -- formats and construction ----------------------------------------------------------------

def test_formats_are_listed_and_unknown_ones_name_the_choices(tokenizers):
    assert available_formats() == sorted(TOOL_FORMATS)
    assert {"hermes", "llama3_json", "mistral"} <= set(TOOL_FORMATS)
    with pytest.raises(ConfigError) as err:
        ToolCallParser("hermes2", tokenizers["base"])
    assert "'hermes2'" in err.value.message and "llama3_json" in err.value.message
    assert err.value.param == "tool_format"


@pytest.mark.parametrize("fmt,marker", [("llama3_json", "<|python_tag|>"),
                                        ("mistral", "tool call token")])
def test_a_tokenizer_without_the_format_marker_is_a_config_error(tokenizers, fmt, marker):
    with pytest.raises(ConfigError, match=f"'{fmt}'.*{marker}"):
        ToolCallParser(fmt, tokenizers["bare"])


# -- auto: what the model chose to write ------------------------------------------------------

@pytest.mark.parametrize("fmt", CASES)
def test_one_call(parsers, fmt):
    _check(parsers[fmt], RENDER[fmt][0]([WEATHER]), [WEATHER])


@pytest.mark.parametrize("fmt", CASES)
def test_two_parallel_calls(parsers, fmt):
    _check(parsers[fmt], RENDER[fmt][0]([WEATHER, TIME]), [WEATHER, TIME])


@pytest.mark.parametrize("fmt", [f for f in CASES if RENDER[f][1]])
def test_content_before_a_call(parsers, fmt):
    _check(parsers[fmt], "Let me look that up. " + RENDER[fmt][0]([WEATHER]), [WEATHER],
           content="Let me look that up.")


@pytest.mark.parametrize("fmt", CASES)
def test_plain_text_is_content(parsers, fmt):
    text = "It is sunny in Zürich, no tool needed."
    _check(parsers[fmt], text, [], content=text)


def test_llama3_json_after_python_tag(parsers):
    _check(parsers["llama3_json"], "<|python_tag|>" + RENDER["llama3_json"][0]([WEATHER]),
           [WEATHER])


def test_tool_choice_none_leaves_the_text_alone(parsers):
    parser, text = parsers["hermes"][0], RENDER["hermes"][0]([WEATHER])
    assert parser.parse(text, TOOLS, "none").tool_calls == []
    assert parser.parse(text, TOOLS, "none").content == text
    assert parser.parse(text, None).content == text  # no tools: nothing to call


@pytest.mark.parametrize("fmt", CASES)
def test_output_cut_short_does_not_raise(parsers, fmt):
    """max_tokens can stop a model mid-call; what is found then is each parser's own call."""
    text = RENDER[fmt][0]([WEATHER, TIME])
    for cut in (len(text) // 3, len(text) - 3):
        parsers[fmt][0].parse(text[:cut], TOOLS)
        _stream(parsers[fmt], text[:cut])


def test_parallel_tool_calls_false_keeps_the_first(parsers):
    _check(parsers["hermes"], RENDER["hermes"][0]([WEATHER, TIME]), [WEATHER], parallel=False)


# -- required / named: constrained decoding ---------------------------------------------------

GENERIC = {"pythonic", "granite", "granite-20b-fc", "granite4", "xlam"}  # vLLM's JSON path


def _forced_text(fmt: str, calls, named: bool) -> str:
    """What constrained decoding lets the model write (checked against the grammar below)."""
    if fmt in GENERIC:
        return _json(calls[0][1]) if named else _array(calls, key="parameters")
    if fmt == "mistral":
        return _array(calls)  # vLLM's own schema for Mistral in transformers mode
    # The format's markup, under a structural tag: hermes' tags follow one another directly.
    return RENDER[fmt][0](calls).replace("</tool_call>\n<", "</tool_call><").rstrip("\n")


def _grammar_accepts(tok, decoding, text: str) -> bool:
    """Whether xgrammar, vLLM's structured-output backend, lets the model write `text` then
    stop, under the constraint `decoding` asks for."""
    import xgrammar

    compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(tok))
    grammar = (compiler.compile_structural_tag(decoding.structural_tag) if decoding.structural_tag
               else compiler.compile_json_schema(json.dumps(decoding.json_schema)))
    matcher = xgrammar.GrammarMatcher(grammar)
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    return all(matcher.accept_token(i) for i in ids) and matcher.is_terminated()


@pytest.mark.parametrize("fmt", [f for f in CASES if f != "mistral_v11"])
def test_required_and_named(parsers, fmt):
    parser = parsers[fmt][0]
    required, named = parser.decoding(TOOLS, "required"), parser.decoding(TOOLS, NAMED)
    if fmt in GENERIC:
        assert required.json_schema == tool_choice_schema(TOOLS, "required")
        assert named.json_schema == tool_choice_schema(TOOLS, NAMED) == _params(["city"])
    elif fmt == "mistral":
        assert required.json_schema["items"]["anyOf"][0]["required"] == ["name", "arguments"]
    else:
        assert required.structural_tag and named.structural_tag and not required.json_schema
    auto = parser.decoding(TOOLS, "auto")
    assert auto.json_schema is None and auto.structural_tag is None
    both, one = _forced_text(fmt, [WEATHER, TIME], False), _forced_text(fmt, [WEATHER], True)
    assert _grammar_accepts(parsers[fmt][1], required, both)
    assert _grammar_accepts(parsers[fmt][1], named, one)
    _check(parsers[fmt], both, [WEATHER, TIME], "required")
    assert _check(parsers[fmt], one, [WEATHER], NAMED).content is None


def test_a_strict_tool_constrains_its_arguments_even_under_auto(parsers):
    """OpenAI's `strict: true`: vLLM then pins the call's arguments to the tool's schema."""
    strict = [{"type": "function", "function": {**TOOLS[0]["function"], "strict": True}}]
    tag = json.loads(parsers["hermes"][0].decoding(strict, "auto").structural_tag)
    assert _params(["city"]) in [t["content"]["json_schema"] for t in tag["format"]["tags"]]
    assert parsers["pythonic"][0].decoding(strict, "auto").structural_tag is None


def test_mistral_v11_refuses_required(parsers):
    parser = parsers["mistral_v11"][0]
    for choice in ("required", NAMED):
        with pytest.raises(BadRequest, match="tool_choice"):
            parser.parse("[]", TOOLS, choice)
    assert parser.decoding(TOOLS, "auto").skip_special_tokens is False


def test_markers_that_are_special_tokens_are_kept_in_the_text(parsers):
    for fmt in ("hermes", "mistral", "granite"):
        assert parsers[fmt][0].decoding(TOOLS).skip_special_tokens is False
    assert parsers["hermes"][0].decoding(TOOLS, "none").skip_special_tokens is True


def test_tool_choice_schema_is_vllms():
    schema = tool_choice_schema(TOOLS, "required")
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    first = schema["items"]["anyOf"][0]
    assert first["properties"]["name"] == {"type": "string", "enum": ["get_weather"]}
    assert first["properties"]["parameters"] == _params(["city"])
    assert tool_choice_schema(TOOLS, "required", parallel_tool_calls=False)["maxItems"] == 1
    assert tool_choice_schema(TOOLS, "auto") is None and tool_choice_schema(TOOLS, "none") is None
    no_params = [{"type": "function", "function": {"name": "ping"}}]
    assert tool_choice_schema(no_params, {"type": "function", "function": {"name": "ping"}}) == \
        {"type": "object", "properties": {}}


def test_parse_constrained():
    calls = parse_constrained(_array([WEATHER, TIME], key="parameters"), "required")
    assert [(c.name, c.arguments) for c in calls] == \
        [("get_weather", '{"city": "Zürich", "days": 3}'), ("get_time", '{"city": "Tokyo"}')]
    assert calls[0].id.startswith("chatcmpl-tool-") and calls[0].id != calls[1].id
    # named: the text is the arguments, verbatim
    named = parse_constrained('{"city":"Bern"}', NAMED)
    assert [(c.name, c.arguments) for c in named] == [("get_weather", '{"city":"Bern"}')]
    assert parse_constrained("  ", NAMED) == []
    assert parse_constrained('[{"name": "get_weather"', "required") == []  # cut short
    with pytest.raises(ValueError):
        parse_constrained("{}", "auto")


@pytest.mark.parametrize("tools,tool_choice,param", [
    (None, "required", "tool_choice"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    (TOOLS, "sometimes", "tool_choice"),
    ([{"type": "function"}], "auto", "tools"),
    ([{"type": "function", "function": {"name": n, "parameters": {"$defs": {"X": {"type": t}}}}}
      for n, t in (("a", "string"), ("b", "integer"))], "required", "tools"),  # clashing $defs
])
def test_bad_tool_requests_are_400s(parsers, tools, tool_choice, param):
    with pytest.raises(BadRequest) as err:
        parsers["pythonic"][0].parse("", tools, tool_choice)
    assert (err.value.param or "").startswith(param)
