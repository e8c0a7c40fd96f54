"""The adapter format, in one place (as PEFT's `constants`): the files of an adapter directory
and the typed `loraplex.json` the trainer writes and the registry reads.

    <adapter dir>/
      adapter_config.json           PEFT config (what vLLM loads)
      adapter_model.safetensors     PEFT LoRA weights
      loraplex.json                 LoraplexManifest: base fingerprint, chat template, stop
                                    tokens, tool-call format, how it was trained
      tokenizer files (optional)    a chat template can also come from here

The manifest is optional for adapters trained elsewhere; every field in it is optional too.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from loraplex.adapters.errors import BadRequest

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LORAPLEX_FILE = "loraplex.json"
MANIFEST_VERSION = 1

# How a model writes tool calls: vLLM's `--tool-call-parser` names, so a model card's advice
# applies as is (server/engine/tool_parsers.py maps each to vLLM's parser and documents the
# families). Here, without vLLM, so the registry and the trainer can check a name.
TOOL_FORMATS = ("hermes", "qwen3_json", "qwen3_coder", "granite4", "llama3_json", "pythonic",
                "mistral", "granite", "granite-20b-fc", "xlam")


def check_tool_format(name: str | None, param: str = "tool_format") -> str | None:
    if name is None or name in TOOL_FORMATS:
        return name
    raise BadRequest(f"tool format {name!r} is not one of {', '.join(TOOL_FORMATS)}: pick the "
                     "one the model writes (its model card's --tool-call-parser)", param=param)


class LoraplexManifest(BaseModel):
    """`loraplex.json`. Unknown fields are kept (newer writers), known ones are typed."""

    model_config = ConfigDict(extra="allow")

    loraplex_manifest: int = MANIFEST_VERSION
    base_fingerprint: str | None = None
    chat_template: str | None = None
    chat_template_name: str | None = None
    stop_tokens: list[str] | None = None
    tool_format: str | None = None
    hyperparameters: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
