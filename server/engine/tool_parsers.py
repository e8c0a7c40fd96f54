"""Tool calls in model output, parsed by vLLM's own parsers; the format is chosen per adapter.

How a model writes a tool call is learned in fine-tuning, so it belongs to an adapter version
(its `tool_format`), not to the server. The names are vLLM's `--tool-call-parser` names, so
a model card's "serve with --tool-call-parser X" applies as is:

    hermes          Hermes 2 Pro / 3, Qwen2.5 (+ Coder), QwQ, Qwen3:
                    <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>, text may precede.
    qwen3_json      vLLM's name for the Qwen2.5 / QwQ / Qwen3 JSON calls; today an alias of hermes.
    qwen3_coder     Qwen3-Coder (and vLLM's qwen3_xml): <tool_call>\\n<function=NAME>\\n
                    <parameter=KEY>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>.
    granite4        Granite 4: <tool_call>{"name": ..., "arguments": {...}}</tool_call>.
    llama3_json     Llama 3.1 / 3.3 JSON calls: {"name": ..., "parameters": {...}}, several joined
                    by "; ", optionally after <|python_tag|> (which must be in the vocabulary).
    pythonic        Llama 3.2 1B/3B, ToolACE: the whole output is [f(a=1), g(b="x")].
    mistral         Mistral: [TOOL_CALLS][{"name": ..., "arguments": {...}}] (7B v0.3, Nemo), or
                    [TOOL_CALLS]NAME[ARGS]{...} when the vocabulary has [ARGS] (tokenizer v11+).
                    [TOOL_CALLS] must be in the vocabulary.
    granite         Granite 3.0 / 3.1: <|tool_call|>[{"name": ..., "arguments": {...}}, ...]
                    (3.0, a special token) or <tool_call>[...] (3.1, text).
    granite-20b-fc  Granite 20B FunctionCalling: <function_call> {"name": ..., "arguments": ...}.
    xlam            Salesforce xLAM: the output is a JSON array [{"name": ..., "arguments": ...}].

Parsing goes through vLLM's `Parser` (ParserManager.get_parser), the object vLLM's chat server
holds per request: it calls the format's `extract_tool_calls` / `extract_tool_calls_streaming`
and also does what the server does around them (the previous-text bookkeeping, which differs
for the engine-based parsers, flushing buffered arguments at the end of a stream, the
required / named dispatch). A vLLM parser takes (tokenizer, tools) and is stateful, hence one
per request and choice; its methods take a vLLM ChatCompletionRequest, built here from plain
OpenAI `tools` dicts and `tool_choice`. No vLLM type leaves this module.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from loraplex.adapters.adapter_format import TOOL_FORMATS as FORMAT_NAMES
from loraplex.adapters.errors import BadRequest, ConfigError

# Our format name -> vLLM's parser name; each is checked by tests/server/test_tool_parsers.py.
# Left out: phi4_mini_json (its streaming finds no calls) and the parsers not tried here, whose
# models bring their own special tokens and templates (deepseek, kimi, glm, gemma4, harmony...).
# The names live in adapters/adapter_format.py (the registry checks them without vLLM).
TOOL_FORMATS: dict[str, str] = {name: name for name in FORMAT_NAMES}

ToolChoice = str | dict[str, Any] | None  # "none" | "auto" | "required" | {"type": "function", ...}


def available_formats() -> list[str]:
    return sorted(TOOL_FORMATS)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None
    tool_calls: list[ToolCall]


@dataclass(frozen=True)
class ToolCallDelta:
    """One piece of an OpenAI streaming `tool_calls` entry: the first piece of a call carries
    its id and name; the `arguments` of all pieces with one index concatenate to its JSON."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True)
class StreamDelta:
    content: str | None = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass(frozen=True)
class Decoding:
    """What generation needs for a tool request, as vLLM's server sets it: a JSON schema or an
    xgrammar structural tag (a JSON string) to constrain the output, for tool_choice required /
    named and, under auto, when a tool says `strict: true`; and whether special tokens stay in
    the text (a format's markers may be special tokens)."""

    json_schema: dict | None = None
    structural_tag: str | None = None
    skip_special_tokens: bool = True


def _request(tools: list[dict] | None, tool_choice: ToolChoice, parallel_tool_calls: bool):
    """The minimal vLLM ChatCompletionRequest the parsers read (tools, tool_choice, ...),
    validated by vLLM itself; a bad value is the client's: 400."""
    from pydantic import ValidationError
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.exceptions import VLLMClientError

    if not tools and tool_choice in (None, "auto"):
        tool_choice = "none"  # vLLM refuses "auto" without tools; OpenAI means "none" then
    body: dict[str, Any] = {"messages": [], "tools": tools or None,
                            "parallel_tool_calls": parallel_tool_calls}
    if tool_choice is not None:  # else vLLM's default: auto with tools
        body["tool_choice"] = tool_choice
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err.get("loc", ())) or "tools"
        raise BadRequest(f"{param}: {err['msg']}", param=param) from None
    except VLLMClientError as exc:  # vLLM's own checks (VLLMValidationError) escape pydantic
        raise BadRequest(exc.args[0], param=getattr(exc, "parameter", None) or "tools") from None


def _named(request) -> str | None:
    """The function a named tool_choice forces, or None."""
    choice = request.tool_choice
    return None if choice is None or isinstance(choice, str) else choice.function.name


def _forces_a_call(request) -> bool:
    return request.tool_choice == "required" or _named(request) is not None


def tool_choice_schema(tools: list[dict] | None, tool_choice: ToolChoice,
                       parallel_tool_calls: bool = True) -> dict | None:
    """vLLM's JSON schema for required / named (`get_json_schema_from_tools`): for required
    an array of {"name", "parameters"} objects (maxItems 1 without parallel calls), for a
    named function its parameters schema; None for auto / none. The formats that answer
    required / named in their own markup use `ToolCallParser.decoding` instead."""
    from vllm.exceptions import VLLMClientError
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    req = _request(tools, tool_choice, parallel_tool_calls)
    try:
        return get_json_schema_from_tools(req.tool_choice, req.tools, req.parallel_tool_calls)
    except (ValueError, VLLMClientError) as exc:  # e.g. two tools' $defs that disagree
        raise BadRequest(exc.args[0], param="tools") from None


def parse_constrained(text: str, tool_choice: ToolChoice) -> list[ToolCall]:
    """The calls in output generated under `tool_choice_schema`: what vLLM's
    DelegatingParser._extract_tool_calls does for parsers with supports_required_and_named
    (the method is private, so its two branches are repeated here). Named: the text is the
    arguments, kept verbatim. Required: the array is validated as vLLM's FunctionDefinition
    list and each call's parameters re-serialized; text that does not validate has no calls."""
    from pydantic import TypeAdapter, ValidationError
    from vllm.entrypoints.generate.base.protocol import FunctionDefinition
    from vllm.renderers.chat_utils import make_tool_call_id

    if isinstance(tool_choice, dict):
        if not text.strip():
            return []
        return [ToolCall(make_tool_call_id(), tool_choice["function"]["name"], text)]
    if tool_choice != "required":
        raise ValueError(f"parse_constrained is for tool_choice required or named, not "
                         f"{tool_choice!r}")
    try:
        calls = TypeAdapter(list[FunctionDefinition]).validate_json(text)
    except ValidationError:
        return []
    return [ToolCall(make_tool_call_id(), c.name, json.dumps(c.parameters, ensure_ascii=False))
            for c in calls]


class ToolCallParser:
    """One tool format over the base model's tokenizer (a transformers tokenizer). Built once
    per (format, base); `parse` and `stream` make the per-request vLLM parser."""

    def __init__(self, format: str, tokenizer: Any):
        if format not in TOOL_FORMATS:
            raise ConfigError(f"unknown tool format {format!r}: use one of "
                              f"{', '.join(available_formats())}", param="tool_format")
        from vllm.parser.parser_manager import ParserManager
        from vllm.tokenizers.hf import get_cached_tokenizer

        self.format = format
        # vLLM's server hands parsers this proxy: get_vocab() (which parsers call when they are
        # made, once per request) is computed once instead of over the whole vocabulary.
        self._tokenizer = get_cached_tokenizer(tokenizer)
        try:  # it also makes one parser, so a tokenizer without the format's markers fails here
            self._parser_cls = ParserManager.get_parser(
                tool_parser_name=TOOL_FORMATS[format], enable_auto_tools=True,
                tokenizer=self._tokenizer)
        except TypeError as exc:
            raise ConfigError(f"tool format {format!r} does not fit this base model's tokenizer: "
                              f"{exc.__cause__ or exc}", param="tool_format") from None
        # True: required / named output is vLLM's generic JSON (tool_choice_schema,
        # parse_constrained). False: the format's own markup, under a structural tag.
        self._json_when_forced = self._parser_cls.tool_parser_cls.supports_required_and_named
        # vLLM 0.32 quirk: with a transformers tokenizer, mistral v11+ (the vocabulary has
        # [ARGS]) constrains required / named to a bare JSON array its v11 parser never reads.
        self._forced_unsupported = format == "mistral" and "[ARGS]" in self._tokenizer.get_vocab()

    def _session(self, tools, tool_choice, parallel_tool_calls):
        """vLLM's request and a fresh parser for it, as vLLM's server makes them."""
        from vllm.exceptions import VLLMClientError

        req = _request(tools, tool_choice, parallel_tool_calls)
        if self._forced_unsupported and _forces_a_call(req):
            raise BadRequest(f"tool_choice {tool_choice!r} does not work with tool format "
                             f"{self.format!r} on this model (its tokenizer has [ARGS]): use "
                             "tool_choice auto", param="tool_choice")
        parser = self._parser_cls(self._tokenizer, req.tools)
        try:  # what vLLM's server does first: sets the constraint and skip_special_tokens
            req = parser.adjust_request(req)
        except (ValueError, VLLMClientError) as exc:  # e.g. two tools' $defs that disagree
            raise BadRequest(exc.args[0], param="tools") from None
        return parser, req

    def decoding(self, tools: list[dict] | None, tool_choice: ToolChoice = None,
                 parallel_tool_calls: bool = True) -> Decoding:
        _, req = self._session(tools, tool_choice, parallel_tool_calls)
        so = req.structured_outputs
        schema = so.json if so is not None else None
        return Decoding(json_schema=json.loads(schema) if isinstance(schema, str) else schema,
                        structural_tag=so.structural_tag if so is not None else None,
                        skip_special_tokens=req.skip_special_tokens)

    def parse(self, text: str, tools: list[dict] | None, tool_choice: ToolChoice = None,
              parallel_tool_calls: bool = True) -> ParsedOutput:
        """Content and tool calls of a finished completion (one choice)."""
        from vllm.renderers.chat_utils import make_tool_call_id

        parser, req = self._session(tools, tool_choice, parallel_tool_calls)
        if self._json_when_forced and _forces_a_call(req):
            named = _named(req)
            content = None
            calls = parse_constrained(text, {"function": {"name": named}} if named
                                      else "required")
        else:
            _, content, found = parser.parse(text, req, enable_auto_tools=True)
            # vLLM's server gives an id to calls whose parser made none, the same way
            calls = [ToolCall(c.id or make_tool_call_id(), c.name, c.arguments)
                     for c in found or []]
        if not parallel_tool_calls:  # as vLLM's maybe_filter_parallel_tool_calls
            calls = calls[:1]
        return ParsedOutput(content or None, calls)

    def stream(self, tools: list[dict] | None, tool_choice: ToolChoice = None,
               parallel_tool_calls: bool = True) -> ToolCallStream:
        """A parser for one streamed choice: feed it every text delta in order."""
        parser, req = self._session(tools, tool_choice, parallel_tool_calls)
        return ToolCallStream(parser, req, self._tokenizer,
                              json_forced=self._json_when_forced and _forces_a_call(req))


class ToolCallStream:
    """Made by `ToolCallParser.stream`: the state of one streamed choice."""

    def __init__(self, parser, request, tokenizer, *, json_forced: bool):
        self._parser, self._request, self._tokenizer = parser, request, tokenizer
        self._json_forced = json_forced  # required / named in vLLM's generic JSON
        self._text = ""
        self._name_sent = False

    def feed(self, delta_text: str, delta_token_ids: Sequence[int] = (),
             finished: bool = False) -> StreamDelta | None:
        """The OpenAI delta for the next piece of output, or None when there is nothing to send
        yet (a parser holds back text that may start a tool call). `finished` on the last piece
        (it may be empty) flushes what the parser still holds."""
        from vllm.tool_parsers.streaming import (
            extract_named_tool_call_streaming,
            extract_required_tool_call_streaming,
        )

        req = self._request
        if not self._json_forced:
            # prompt_token_ids=[]: vLLM only enters its tool phase after seeing the prompt (to
            # know whether reasoning is still open); there is no reasoning parser here.
            msg = self._parser.parse_delta(delta_text, list(delta_token_ids), req,
                                           prompt_token_ids=[], finished=finished)
        elif _named(req):
            if not delta_text:
                return None
            msg, self._name_sent = extract_named_tool_call_streaming(
                delta_text=delta_text, function_name=_named(req),
                function_name_returned=self._name_sent, tool_call_idx=None,
                tool_call_id_type="random", tokenizer=self._tokenizer)
        else:
            # Called directly, with our own running text: vLLM's parse_delta hands the
            # engine-based parsers (granite) only the delta, and this function then finds nothing.
            previous, self._text = self._text, self._text + delta_text
            msg, _ = extract_required_tool_call_streaming(
                previous_text=previous, current_text=self._text, tool_call_idx=None,
                tool_call_id_type="random")
        if msg is None:
            return None
        calls = [ToolCallDelta(index=tc.index, id=tc.id,
                               name=tc.function.name if tc.function else None,
                               arguments=(tc.function.arguments or "") if tc.function else "")
                 for tc in msg.tool_calls or []
                 if req.parallel_tool_calls is not False or tc.index == 0]
        if not msg.content and not calls:
            return None
        return StreamDelta(content=msg.content or None, tool_calls=calls)
