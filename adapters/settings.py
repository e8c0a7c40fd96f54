"""Registry settings: where the metadata DB and the artifacts live, and the adapter limits.

Every field maps to an env var `LORAPLEX_<FIELD>` (e.g. `LORAPLEX_REGISTRY_URL`). By default
everything lives under `LORAPLEX_HOME` (~/.loraplex): `registry.db` (SQLite) and `artifacts/`.
In a cluster: `LORAPLEX_REGISTRY_URL=postgresql+psycopg://...` and
`LORAPLEX_ARTIFACTS_URL=s3://bucket/prefix` (credentials from `LORAPLEX_S3_*` or the usual
`AWS_*` variables, which s3fs reads itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class RegistrySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="ignore")

    home: Path = Field(default=Path("~/.loraplex"), description="Root of local state.")
    registry_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default sqlite:///<home>/registry.db"
    )
    artifacts_url: str | None = Field(
        default=None, description="fsspec URL or local dir; default <home>/artifacts"
    )
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint")
    s3_key: str | None = None
    s3_secret: SecretStr | None = None
    max_adapter_rank: int = Field(default=64, ge=1)
    max_adapter_bytes: int = Field(default=1 << 30, ge=1)

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser()

    def resolved_registry_url(self) -> str:
        return self.registry_url or f"sqlite:///{self.home_dir / 'registry.db'}"

    def resolved_artifacts_url(self) -> str:
        return self.artifacts_url or str(self.home_dir / "artifacts")

    def storage_options(self) -> dict[str, Any]:
        """fsspec options for remote stores (only the ones set; s3fs reads AWS_* itself)."""
        opts: dict[str, Any] = {}
        if self.s3_endpoint_url:
            opts["endpoint_url"] = self.s3_endpoint_url
        if self.s3_key:
            opts["key"] = self.s3_key
        if self.s3_secret:
            opts["secret"] = self.s3_secret.get_secret_value()
        return opts
