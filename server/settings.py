"""The one settings object of `loraplex serve`.

Every field is an env var `LORAPLEX_<FIELD>` and a `loraplex serve --<field>` flag (flags win).
It extends the registry settings, so the server finds the same SQL store and artifact store as
the `loraplex adapters` command and the trainer. The Helm chart's env list is checked against
these fields by the deploy tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from loraplex.adapters.settings import RegistrySettings


class ServerSettings(RegistrySettings):
    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="ignore")

    # -- what is served --
    model: Path = Field(default=Path("toy-model"), description="Base model directory (HF format).")
    served_model_name: str = Field(default="base", description="The name clients use for the base.")
    base_name: str | None = Field(
        default=None, description="Registered base this server serves; default: served_model_name."
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)

    # -- auth: empty api_keys means no key is needed on the OpenAI routes --
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list, description="Comma-separated keys.")
    admin_key: SecretStr | None = Field(default=None, description="Key for /admin routes.")

    # -- engine (vLLM) --
    max_model_len: int = Field(default=2048, ge=16)
    max_loras: int = Field(default=4, ge=1, description="Adapters on the accelerator at once.")
    max_lora_rank: int = Field(default=16, ge=1)
    max_cpu_loras: int = Field(default=16, ge=1, description="Adapters kept in host memory.")
    max_num_seqs: int = Field(default=64, ge=1)
    dtype: str = "auto"
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    cpu_kvcache_space_gib: int | None = Field(default=None, ge=1, description="KV cache GiB on CPU.")
    enforce_eager: bool = False
    seed: int = 0

    # -- adapters --
    poll_interval_s: float = Field(default=2.0, gt=0, description="Registry change polling.")
    adapter_cache_dir: Path | None = Field(default=None, description="Default <home>/cache.")
    adapter_cache_bytes: int = Field(default=20 << 30, ge=1 << 20, description="Disk cache cap.")
    preload: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Refs to load (and pin) at start.")

    # -- admission --
    max_queue: int = Field(default=256, ge=1, description="In-flight requests before 429.")
    drain_timeout_s: float = Field(default=30.0, ge=0, description="SIGTERM: wait for streams.")

    @field_validator("api_keys", "preload", mode="before")
    @classmethod
    def _comma_list(cls, v):
        # Env vars hold one string: "a,b,c".
        if isinstance(v, str):
            return [x.strip() for x in v.split(",") if x.strip()]
        return v

    @property
    def base(self) -> str:
        return self.base_name or self.served_model_name

    @property
    def cache_dir(self) -> Path:
        return (self.adapter_cache_dir or self.home_dir / "cache").expanduser()
