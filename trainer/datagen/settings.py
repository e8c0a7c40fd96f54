"""The one settings object of `loraplex data generate`: which endpoint teaches, and how.

Every field is an env var `LORAPLEX_DATA_<FIELD>` and a flag (flags win), e.g.
`LORAPLEX_DATA_URL` / `--url`. The API key is never a flag (argv is visible to every user of
the machine): it is `LORAPLEX_DATA_API_KEY`, or the variable `--api-key-env NAME` names (e.g.
`--api-key-env OPENAI_API_KEY`), read here and nowhere else. Without a key the client sends
"EMPTY" (a loraplex server without `api_keys`, vLLM's own server without `--api-key`).
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class DataSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAPLEX_DATA_", extra="ignore")

    url: str = Field(default="http://127.0.0.1:8000/v1",
                     description="OpenAI-compatible base URL (a bare host:port gets /v1).")
    model: str = Field(default="base", description="Teacher: the base's served name, an adapter "
                       "(name, name@3, name:prod) or any model the endpoint serves.")
    api_key: SecretStr | None = Field(default=None, description="API key (env only).")
    api_key_env: str | None = Field(default=None, description="Read the API key from this "
                                    "environment variable.")
    concurrency: int = Field(default=8, ge=1, le=1024, description="Requests in flight.")
    max_retries: int = Field(default=6, ge=0, description="Retries of a request on 429, 5xx, "
                             "timeouts and connection errors.")
    backoff_s: float = Field(default=0.5, gt=0, description="First retry delay; doubles per try.")
    max_backoff_s: float = Field(default=30.0, gt=0, description="Longest computed retry delay "
                                 "(a longer Retry-After is still honoured).")
    timeout_s: float = Field(default=300.0, gt=0, description="Per-request timeout.")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        v = v.strip().rstrip("/")
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("give an http(s) URL such as http://127.0.0.1:8000/v1")
        if parts.path in ("", "/"):
            v += "/v1"
        return v

    @model_validator(mode="after")
    def _key_from_env(self) -> DataSettings:
        if self.api_key_env:  # named on purpose: wins over LORAPLEX_DATA_API_KEY
            value = os.environ.get(self.api_key_env)
            if not value:
                raise ValueError(f"--api-key-env {self.api_key_env}: the variable "
                                 f"{self.api_key_env} is not set (or empty)")
            self.api_key = SecretStr(value)
        return self

    def key(self) -> str:
        return self.api_key.get_secret_value() if self.api_key else "EMPTY"
