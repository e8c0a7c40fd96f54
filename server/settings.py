"""The one settings object of `loraplex serve`.

Every field is an env var `LORAPLEX_<FIELD>` and a `loraplex serve --<field>` flag (flags win).
It extends the registry settings, so the server finds the same SQL store and artifact store as
the `loraplex adapters` command and the trainer. The Helm chart's env list is checked against
these fields by the deploy tests.

The engine fields (`ENGINE_FIELDS`) go to vLLM's `EngineArgs` under the same name; `None`
leaves vLLM's own default, which it mostly derives from the model (e.g. `max_model_len` from the
model config). Any other `EngineArgs` field is set through `engine_args` (`--engine-arg
KEY=VALUE`, or `LORAPLEX_ENGINE_ARGS` as a JSON object), checked against vLLM's EngineArgs at
start by `loraplex.server.engine.build_engine_args`, the one place that turns these settings
into vLLM's arguments.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from loraplex.adapters.settings import RegistrySettings


class ServerSettings(RegistrySettings):
    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="ignore")

    # -- what is served --
    model: str | Path = Field(
        default="toy-model",
        description="Base model: a directory (HF format) or a hub id org/name[@revision], resolved "
        "from the HF cache (HF_HOME; downloaded unless HF_HUB_OFFLINE=1).",
    )
    served_model_name: str = Field(default="base", description="The name clients use for the base.")
    base_name: str | None = Field(
        default=None, description="Registered base this server serves; default: served_model_name."
    )
    tool_format: str | None = Field(
        default=None, description="How the base (and adapters that set none) write tool calls: "
        "a vLLM --tool-call-parser name (hermes, llama3_json, mistral...). None: requests with "
        "tools are refused for them.")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)

    # -- auth: empty api_keys means no key is needed on the OpenAI routes --
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list, description="Comma-separated keys.")
    admin_key: SecretStr | None = Field(default=None, description="Key for /admin routes.")

    # -- engine (vLLM): the fields in ENGINE_FIELDS; None = vLLM's default (from the model) --
    max_model_len: int | None = Field(default=None, ge=16, description="Context length; default: the model's.")
    max_loras: int = Field(default=4, ge=1, description="Adapters on the accelerator at once.")
    max_lora_rank: int = Field(default=16, ge=1)
    max_cpu_loras: int = Field(default=16, ge=1, description="Adapters kept in host memory.")
    max_num_seqs: int = Field(default=64, ge=1)
    dtype: str = "auto"
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    cpu_kvcache_space_gib: int | None = Field(default=None, ge=1, description="KV cache GiB on CPU.")
    enforce_eager: bool = False
    seed: int = 0
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs per pipeline stage (tensor parallelism).")
    pipeline_parallel_size: int = Field(default=1, ge=1, description="Pipeline stages (GPUs = TP x PP).")
    quantization: str | None = Field(
        default=None, description="Weight quantization method (fp8, awq, gptq, ...); default: the model's config."
    )
    kv_cache_dtype: str | None = Field(default=None, description="KV cache dtype (auto, fp8, ...); default auto.")
    max_num_batched_tokens: int | None = Field(default=None, ge=1, description="Tokens per engine step.")
    enable_chunked_prefill: bool | None = Field(default=None, description="Default: vLLM's choice.")
    enable_prefix_caching: bool = True
    distributed_executor_backend: str | None = Field(
        default=None, description="mp, ray, uni or external_launcher; default: vLLM's choice."
    )
    trust_remote_code: bool = Field(default=False, description="Run the model repository's own code.")
    revision: str | None = Field(
        default=None, description="Hub revision (branch, tag or commit) of a hub id --model."
    )
    engine_args: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict,
        description="Any other vLLM EngineArgs field: a JSON object; flag --engine-arg KEY=VALUE (repeatable).",
    )

    # -- adapters --
    poll_interval_s: float = Field(default=2.0, gt=0, description="Registry change polling.")
    adapter_cache_dir: Path | None = Field(default=None, description="Default <home>/cache.")
    adapter_cache_bytes: int = Field(default=20 << 30, ge=1 << 20, description="Disk cache cap.")
    preload: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Refs to load (and pin) at start.")
    lora_slot_gate: bool = Field(
        default=False, description="Hand the engine requests for at most max_loras adapters at once; a freed slot goes to the adapter with the most waiting requests (server/slot_gate.py)."
    )
    lora_slot_deadline_s: float = Field(
        default=2.0, gt=0, description="With lora_slot_gate: a request waiting this long for a slot goes next."
    )
    lora_prefetch: bool = Field(
        default=True, description="Read an adapter missing from the engine's host cache on a worker thread as its request arrives, not inside the step that schedules it."
    )
    auto_pin: int = Field(
        default=0, ge=0, description="Pin this many of the most requested adapters (over the last auto_pin_window requests) in the engine's host cache, following traffic; 0 = off. At most max_cpu_loras - max_loras; an operator's pin displaces the least requested of them."
    )
    auto_pin_window: int = Field(
        default=1000, ge=10, description="With auto_pin: how many recent adapter requests rank the adapters."
    )

    # -- admission --
    max_queue: int = Field(default=256, ge=1, description="In-flight requests before 429.")
    drain_timeout_s: float = Field(default=30.0, ge=0, description="SIGTERM: wait for streams.")
    # -- request size (413 before the body is read; counted while streaming when chunked) --
    max_request_bytes: int = Field(
        default=16 << 20, ge=1, description="Largest request body in bytes, on every route but the admin upload."
    )
    max_upload_bytes: int = Field(
        default=2 << 30, ge=1, description="Largest admin upload (POST /admin/adapters archive) in bytes."
    )
    # -- access control (server/auth.py, docs/security.md) --
    keys_file: Path | None = Field(
        default=None, description="YAML/JSON file of hashed API keys with scopes, visible adapters "
        "and limits; re-read when it changes."
    )
    keys_inline: SecretStr | None = Field(
        default=None, description="The keys file's content as a string (from a Secret)."
    )

    @field_validator("api_keys", "preload", mode="before")
    @classmethod
    def _comma_list(cls, v):
        # Env vars hold one string: "a,b,c".
        if isinstance(v, str):
            return [x.strip() for x in v.split(",") if x.strip()]
        return v

    @property
    def pin_room(self) -> int:
        """How many adapters may be pinned: vLLM's host LRU (max_cpu_loras) must still take a
        full batch (max_loras) of unpinned ones (AdapterManager.pin)."""
        return max(self.max_cpu_loras - self.max_loras, 0)

    @model_validator(mode="after")
    def _pins_fit(self):
        # Preloaded adapters are pinned; automatic pins yield to them (AdapterManager.pin).
        if len(self.preload) > self.pin_room:
            raise ValueError(
                f"preload names {len(self.preload)} adapters and at most max_cpu_loras - "
                f"max_loras = {self.max_cpu_loras} - {self.max_loras} = {self.pin_room} can be "
                "pinned; raise LORAPLEX_MAX_CPU_LORAS or preload fewer")
        if self.auto_pin > self.pin_room:
            raise ValueError(
                f"auto_pin is {self.auto_pin} and at most max_cpu_loras - max_loras = "
                f"{self.max_cpu_loras} - {self.max_loras} = {self.pin_room} adapters can be "
                "pinned; set LORAPLEX_AUTO_PIN to at most that or raise LORAPLEX_MAX_CPU_LORAS")
        return self

    @field_validator("tool_format")
    @classmethod
    def _tool_format(cls, v):
        from loraplex.adapters.adapter_format import TOOL_FORMATS

        if v is not None and v not in TOOL_FORMATS:
            raise ValueError(f"{v!r} is not one of {', '.join(TOOL_FORMATS)} (vLLM's "
                             "--tool-call-parser names)")
        return v

    @field_validator("engine_args", mode="before")
    @classmethod
    def _json_object(cls, v):
        # The env var holds a JSON object ("" or null: none).
        if v is None:
            return {}
        if isinstance(v, str):
            if not v.strip():
                return {}
            try:
                v = json.loads(v)
            except json.JSONDecodeError as exc:
                raise ValueError(f'not JSON ({exc}); give an object such as {{"block_size": 32}}') from None
            if v is None:
                return {}
            if not isinstance(v, dict):
                raise ValueError('give a JSON object of EngineArgs fields, such as {"block_size": 32}')
        return v

    @property
    def base(self) -> str:
        return self.base_name or self.served_model_name

    @property
    def cache_dir(self) -> Path:
        return (self.adapter_cache_dir or self.home_dir / "cache").expanduser()


# ServerSettings fields that are vLLM EngineArgs fields of the same name (and meaning). `revision`
# is not among them: it picks the hub snapshot `--model` resolves to, and vLLM gets that directory.
ENGINE_FIELDS = (
    "max_model_len", "max_loras", "max_lora_rank", "max_cpu_loras", "max_num_seqs", "dtype",
    "gpu_memory_utilization", "enforce_eager", "seed", "tensor_parallel_size",
    "pipeline_parallel_size", "quantization", "kv_cache_dtype", "max_num_batched_tokens",
    "enable_chunked_prefill", "enable_prefix_caching", "distributed_executor_backend",
    "trust_remote_code",
)
