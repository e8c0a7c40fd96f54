"""OpenAI request bodies, validated with pydantic (responses are built as plain dicts).

Unknown fields are ignored, as OpenAI clients send newer fields freely; known fields are
checked against OpenAI's documented ranges so a bad value is a 400 naming its `param`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loraplex.adapters.errors import BadRequest


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema object with a schema")
        return self


class _Sampling(_Body):
    model: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)  # the engine's int64
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    # vLLM's sampling extensions, with vLLM's names and defaults.
    ignore_eos: bool = False  # generate max_tokens even past the end-of-turn token
    top_k: int | None = Field(default=None, ge=-1)  # -1 or 0: all tokens
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0, le=2)
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = Field(default=None, max_length=64)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return v
        if len(v) > 300:  # OpenAI's limit
            raise ValueError("at most 300 tokens")
        for k, b in v.items():
            if not k.isascii() or not k.isdigit():
                raise ValueError(f"keys must be token ids as strings such as \"50256\" (got {k!r})")
            if not -100 <= b <= 100:
                raise ValueError(f"biases must be in [-100, 100] (got {b} for {k})")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class FunctionDef(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: str


class ToolChoiceFunction(_Body):
    type: Literal["function"]
    function: NamedFunction


def check_tool_choice(tc: str | ToolChoiceFunction | None, tools: list[Tool] | None) -> None:
    """A tool_choice other than none needs tools, and a named one a tool of that name (chat's
    and the Responses API's check: Responses converts its fields to chat's first)."""
    if tc is not None and tc != "none" and not tools:
        raise BadRequest("tool_choice needs tools: send the tools the model may call",
                         param="tool_choice")
    if isinstance(tc, ToolChoiceFunction) and tc.function.name not in {
            t.function.name for t in tools}:
        raise BadRequest(f"tool_choice names function {tc.function.name!r}, which is not in "
                         "tools", param="tool_choice")


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool = True
    # vLLM's extension: extra variables for the chat template (e.g. enable_thinking).
    chat_template_kwargs: dict[str, Any] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        return self

    @model_validator(mode="after")
    def _tool_choice_needs_tools(self):
        check_tool_choice(self.tool_choice, self.tools)
        return self

    def tool_mode(self) -> str:
        """none | auto | required | named (OpenAI's default: auto with tools, none without)."""
        tc = self.tool_choice
        if isinstance(tc, ToolChoiceFunction):
            return "named"
        return tc or ("auto" if self.tools else "none")

    def max_new_tokens(self) -> int | None:
        # max_completion_tokens is the newer name; it wins when both are sent.
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    # A prompt or a batch of prompts (strings or token-id lists), as lm-evaluation-harness sends.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)  # 0 with echo: score the prompt only
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.suffix:
            raise BadRequest("suffix (insertion) is not supported; send the prompt only",
                             param="suffix")
        if self.max_tokens == 0 and not self.echo:
            raise BadRequest("max_tokens 0 only scores the prompt, which needs echo: true",
                             param="max_tokens")
        if self.max_tokens == 0 and self.stream:
            raise BadRequest("max_tokens 0 (scoring) cannot be streamed; send stream: false",
                             param="stream")
        return self


class RenderRequest(_Body):
    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a prompt, or messages rendered with the model's chat template."""

    model: str | None = Field(default=None, min_length=1)  # None: the base, as vLLM
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise BadRequest("send either prompt or messages", param="prompt")
        return self


class DetokenizeRequest(_Body):
    model: str | None = Field(default=None, min_length=1)
    tokens: list[int]
