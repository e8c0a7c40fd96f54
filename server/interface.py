"""The small interface between the API server and the inference engine.

Only `loraplex.server.engine` (a package) imports vLLM; everything else (routes, adapter manager, metrics)
speaks these plain dataclasses, so it can be read and unit-tested without an engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class LoraRef:
    """One adapter version as the engine sees it.

    `int_id` is stable and unique per (name, version): vLLM keys its LoRA slots and prefix
    cache on it, so a new version never reuses the old version's cached KV blocks.
    """

    name: str
    version: int
    int_id: int
    path: str

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class SamplingSpec:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None  # None: the engine's default (all tokens)
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # top-k alternatives per token; 0 = only the chosen token
    json_schema: dict | None = None
    json_object: bool = False
    structural_tag: str | None = None  # xgrammar structural tag (forced tool calls, tool_parsers)
    ignore_eos: bool = False
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Logprobs of the prompt's tokens (echo with logprobs): top-k alternatives, 0 = the token.
    prompt_logprobs: int | None = None


@dataclass
class TokenLogprob:
    token: str
    logprob: float | None  # None: the first prompt token (echo), which has no context
    top: list[tuple[str, float]]


@dataclass
class CompletionDelta:
    """New output of one of the `n` choices since the previous chunk."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass
class Chunk:
    deltas: list[CompletionDelta]
    prompt_tokens: int
    finished: bool
    # With `prompt_logprobs`, on the first chunk: one entry per prompt token (None for the
    # first, which has no context to be scored in).
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class GenRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    lora: LoraRef | None = None


class Engine(Protocol):
    """What the server needs from an inference engine."""

    max_model_len: int

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def generate(self, req: GenRequest) -> AsyncIterator[Chunk]:
        """Stream deltas; closing the iterator early aborts the request in the engine."""
        ...

    def check(self, req: GenRequest) -> None:
        """Raise BadRequest (naming the parameter) for what the engine would refuse; called
        before the request is admitted, so it never becomes an error inside a stream."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def add_lora(self, lora: LoraRef) -> None:
        """Load the adapter into the engine's host cache (so the first request is not a load)."""
        ...

    async def remove_lora(self, lora: LoraRef) -> None: ...

    async def pin_lora(self, lora: LoraRef) -> None:
        """Keep the adapter in the engine's host cache (never evicted from it) until unpinned."""
        ...

    async def unpin_lora(self, lora: LoraRef) -> None:
        """Let the host cache evict the adapter again; nothing is read or moved."""
        ...

    async def lora_residency(self) -> dict[int, set[str]] | None:
        """Where the engine holds each adapter it knows, by int id: a subset of
        {"accelerator", "host", "pinned"} (in one of the `max_loras` batch slots / in its
        host-memory LRU of `max_cpu_loras` / pinned there). None when the engine cannot tell."""
        ...

    async def check_health(self) -> None:
        """Raise if the engine is dead."""
        ...

    @property
    def ready(self) -> bool: ...
