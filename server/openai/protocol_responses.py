"""The Responses API request (POST /v1/responses), stateless, validated with pydantic.

What it takes: `input` (a string, or message / function_call / function_call_output items),
`instructions`, the sampling fields chat has (`_Sampling`, so ranges and vLLM's extensions are
checked the same way), `max_output_tokens`, flat function `tools`, `tool_choice`,
`parallel_tool_calls`, `text.format` (structured output), logprobs via `top_logprobs` and
`include`. What needs a response store is refused with a 400 naming its param: this server
keeps no responses, so `store: true`, `previous_response_id`, `conversation`, `background`,
stored `prompt`s and `item_reference` input items cannot work. So are hosted tools
(web_search, file_search, ...) and non-text parts: a 400 beats an answer that silently
ignored them. `chat_messages()` turns the input into the chat messages the chat template sees.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from loraplex.adapters.errors import BadRequest
from loraplex.server.openai.protocol import (
    ChatCompletionRequest,
    FunctionDef,
    NamedFunction,
    Tool,
    ToolChoiceFunction,
    _Body,
    _Sampling,
    check_tool_choice,
)

STATELESS = ("this server is stateless (it keeps no responses): send the whole conversation in "
             "`input` instead")
LOGPROBS = "message.output_text.logprobs"  # the `include` value that asks for logprobs
_ROLES = ("user", "assistant", "system", "developer")
_TEXT_PARTS = ("input_text", "output_text", "text")


class FunctionTool(FunctionDef):
    """Responses' function tool: flat (chat's function fields beside `type`), where chat nests
    them under `function`."""

    type: Literal["function"]


class NamedTool(_Body):
    type: Literal["function"]
    name: str


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("type 'json_schema' needs a schema")
        return self


class TextConfig(_Body):
    format: TextFormat | None = None


class ResponsesRequest(_Sampling):
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    n: int = 1  # not a Responses field: one output per request
    tools: list[FunctionTool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    include: list[str] | None = None
    metadata: dict[str, str] | None = None
    reasoning: dict[str, Any] | None = None  # accepted and echoed: these models do not reason
    safety_identifier: str | None = None  # the newer name of `user`
    # The stateful ones, refused below: accepted here only to name them in the 400.
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    background: bool | None = None
    prompt: dict[str, Any] | None = None

    @field_validator("n")
    @classmethod
    def _one(cls, v):
        if v != 1:
            raise ValueError("the Responses API has one output per request; use "
                             "/v1/chat/completions for n > 1")
        return v

    @field_validator("input")
    @classmethod
    def _some_input(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("input must be a string or a non-empty list of items")
        return v

    @model_validator(mode="before")
    @classmethod
    def _function_tools_only(cls, data):
        """Hosted tools (web_search, file_search, code_interpreter, mcp, ...) run on OpenAI's
        side; named here so the 400 says which, not that a `name` is missing."""
        if not isinstance(data, dict):
            return data
        for i, t in enumerate(data.get("tools") or []):
            kind = t.get("type") if isinstance(t, dict) else None
            if kind != "function":
                raise BadRequest(f"tool type {kind!r} is not supported: this server runs "
                                 "function tools only", param=f"tools[{i}].type")
        tc = data.get("tool_choice")
        if isinstance(tc, dict) and tc.get("type") != "function":
            raise BadRequest(f"tool_choice type {tc.get('type')!r} is not supported: use "
                             "none, auto, required or {\"type\": \"function\", \"name\": ...}",
                             param="tool_choice")
        return data

    @model_validator(mode="after")
    def _stateless(self):
        if self.store:  # only when sent: OpenAI's default is true, clients omit it
            raise BadRequest(f"store: true is not supported: {STATELESS}; send store: false "
                             "or leave it out", param="store")
        for param in ("previous_response_id", "conversation", "prompt"):
            if getattr(self, param) is not None:
                raise BadRequest(f"{param} is not supported: {STATELESS}", param=param)
        if self.background:
            raise BadRequest(f"background: true is not supported: {STATELESS}",
                             param="background")
        return self

    @model_validator(mode="after")
    def _tool_choice_needs_tools(self):
        check_tool_choice(self.chat_tool_choice(), self.chat_tools())
        return self

    # -- as chat sees it ------------------------------------------------------------------
    def chat_tools(self) -> list[Tool] | None:
        return [Tool(type="function", function=FunctionDef(
            name=t.name, description=t.description, parameters=t.parameters, strict=t.strict))
            for t in self.tools] if self.tools else None

    def chat_tool_choice(self) -> str | ToolChoiceFunction | None:
        tc = self.tool_choice
        if isinstance(tc, NamedTool):
            return ToolChoiceFunction(type="function", function=NamedFunction(name=tc.name))
        return tc

    def as_chat(self) -> ChatCompletionRequest:
        """The tool fields as a chat request (for ChatServing.tools_for); not validated
        again, and without messages: only the tool side reads it."""
        return ChatCompletionRequest.model_construct(
            model=self.model, messages=[], tools=self.chat_tools(),
            tool_choice=self.chat_tool_choice(), parallel_tool_calls=self.parallel_tool_calls)

    def logprobs(self) -> int | None:
        """Top alternatives per token when `include` asks for logprobs, else None."""
        return (self.top_logprobs or 0) if LOGPROBS in (self.include or []) else None

    def chat_messages(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The chat messages of `instructions` + `input`, and for each the param it came from
        (so a template's complaint about messages[i] names the request's own field).
        Consecutive function_call items become one assistant turn's `tool_calls`, each
        function_call_output a `tool` message, as vLLM's server maps them."""
        msgs: list[dict[str, Any]] = []
        where: list[str] = []
        if self.instructions:
            msgs.append({"role": "system", "content": self.instructions})
            where.append("instructions")
        if isinstance(self.input, str):
            return msgs + [{"role": "user", "content": self.input}], where + ["input"]
        for i, item in enumerate(self.input):
            at = f"input[{i}]"
            if not isinstance(item, dict):
                raise BadRequest(f"{at} must be an object (a message or a function call item)",
                                 param=at)
            kind = item.get("type", "message")
            if kind == "message":
                role = item.get("role")
                if role not in _ROLES:
                    raise BadRequest(f"{at}.role {role!r} is not supported; use one of "
                                     f"{', '.join(_ROLES)}", param=f"{at}.role")
                msgs.append({"role": role, "content": _text(item.get("content"), f"{at}.content",
                                                            nullable=role == "assistant")})
            elif kind == "function_call":
                call = {"id": _str(item, "call_id", at), "type": "function", "function": {
                    "name": _str(item, "name", at), "arguments": _str(item, "arguments", at)}}
                last = msgs[-1] if msgs else None
                if last is not None and last["role"] == "assistant" and where[-1] != "instructions":
                    last.setdefault("tool_calls", []).append(call)  # one turn's calls together
                    continue
                msgs.append({"role": "assistant", "content": "", "tool_calls": [call]})
            elif kind == "function_call_output":
                msgs.append({"role": "tool", "tool_call_id": _str(item, "call_id", at),
                             "content": _text(item.get("output"), f"{at}.output")})
            elif kind == "reasoning":
                continue  # another model's reasoning trace: nothing these templates can show
            elif kind == "item_reference":
                raise BadRequest(f"{at}: item_reference is not supported: {STATELESS}",
                                 param=f"{at}.type")
            else:
                raise BadRequest(f"{at}.type {kind!r} is not supported; send message, "
                                 "function_call or function_call_output items",
                                 param=f"{at}.type")
            where.append(at)
        return msgs, where


def _str(item: dict, key: str, at: str) -> str:
    v = item.get(key)
    if not isinstance(v, str) or (key != "arguments" and not v):
        raise BadRequest(f"{at}.{key} must be a non-empty string", param=f"{at}.{key}")
    return v


def _text(content: Any, at: str, nullable: bool = False) -> str:
    """A string, or text parts (input_text / output_text / refusal) joined with newlines as
    chat joins its parts; images, files and audio are refused (these are text models)."""
    if content is None and nullable:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{at} must be a string or a list of input_text parts", param=at)
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        key = "refusal" if kind == "refusal" else "text"
        if (kind not in _TEXT_PARTS and kind != "refusal") or not isinstance(part.get(key), str):
            raise BadRequest(f"{at}[{j}] of type {kind!r} is not supported: this server serves "
                             "text models; send input_text parts", param=f"{at}[{j}]")
        parts.append(part[key])
    return "\n".join(parts)


_MESSAGE_PARAM = re.compile(r"^messages\[(\d+)\]")


def input_param(param: str | None, where: list[str]) -> str | None:
    """A chat-side param (`messages[2].content`) as the request named it (`input[1]`)."""
    if not param or not param.startswith("messages"):
        return param
    m = _MESSAGE_PARAM.match(param)
    return where[int(m.group(1))] if m and int(m.group(1)) < len(where) else "input"
