"""The records of the registry: a base model, an adapter version, an alias, a snapshot, a
promotion decision.

These pydantic models are the contract between the registry, the trainer and the server. The
snapshot carries everything a server needs to resolve references in memory (no DB round trip per
request); `RegistrySnapshot.resolve` follows the same rules as `Registry.resolve`.
"""

from __future__ import annotations

import hashlib
import random
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from loraplex.adapters.errors import AdapterNotFound
from loraplex.adapters.refs import DEFAULT_ALIAS, LATEST, Ref, parse_ref


class BaseModelRecord(BaseModel):
    """A registered base model: its identity and the shapes adapters are checked against."""

    name: str
    fingerprint: str
    architecture: str | None = None
    # Linear module suffix under `<layer_prefix>.N.` (e.g. "self_attn.q_proj") -> (in, out).
    modules: dict[str, tuple[int, int]]
    layer_prefix: str = "model.layers"
    num_layers: int
    vocab_size: int | None = None
    hidden_size: int | None = None
    chat_template: str | None = None
    eos_tokens: list[str] = Field(default_factory=list)
    source_dir: str | None = None
    created_at: datetime | None = None


class AdapterSummary(BaseModel):
    """What validation learned about an adapter directory (nothing is stored yet)."""

    peft_type: str
    rank: int
    alpha: float
    target_modules: list[str]  # base module suffixes the adapter touches, sorted
    files: dict[str, str]  # relpath -> sha256
    sizes: dict[str, int]  # relpath -> bytes
    total_size: int
    chat_template: str | None = None  # from loraplex.json or the adapter's tokenizer files
    chat_template_source: str | None = None
    stop_tokens: list[str] | None = None
    tool_format: str | None = None  # from loraplex.json
    declared_base_fingerprint: str | None = None
    base_model_name_or_path: str | None = None


class AdapterVersion(BaseModel):
    """One immutable version of a named adapter (frozen: safe to cache and share)."""

    model_config = ConfigDict(frozen=True)

    id: int  # DB row id: stable, unique, positive; the server's vLLM lora_int_id
    name: str
    version: int
    base_name: str
    base_fingerprint: str
    peft_type: str
    rank: int
    alpha: float
    target_modules: list[str]
    chat_template: str | None = None
    chat_template_sha256: str | None = None
    stop_tokens: list[str] = Field(default_factory=list)
    # How the model writes tool calls (hermes, llama3_json, mistral...): the server parses this
    # version's output with it. None: the base's default (`LORAPLEX_TOOL_FORMAT`), if any.
    tool_format: str | None = None
    artifact_uri: str
    content_sha256: str  # identity of (files, base, template, stops): equal => same version
    files: dict[str, str]
    total_size: int
    created_at: datetime
    description: str = ""
    tags: dict[str, str] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    state: Literal["active", "archived"] = "active"

    @property
    def lora_int_id(self) -> int:
        return self.id

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class Alias(BaseModel):
    """`name:alias` -> one version, or a weighted split across versions (canaries)."""

    name: str
    alias: str
    weights: list[tuple[int, int]]  # (version, weight > 0)
    updated_at: datetime | None = None

    @property
    def target(self) -> str:
        """`3` for a plain alias, `3:90,4:10` for a split (the CLI's syntax)."""
        return weights_text(self.weights)


class PushResult(BaseModel):
    version: AdapterVersion
    created: bool  # False: identical content was already registered, nothing new written
    message: str
    alias: Alias | None = None
    notes: list[str] = Field(default_factory=list)


class RuleResult(BaseModel):
    """One rule of a promotion gate, as judged on the figures of one decision."""

    metric: str  # "<eval set>.<figure>", e.g. "golden.pass_rate"
    rule: Literal["min", "max", "max_regression"]
    threshold: float
    candidate: float | None = None
    baseline: float | None = None
    passed: bool
    detail: str = ""


class PromotionDecision(BaseModel):
    """One `loraplex adapters promote` decision: who, when, the figures of both sides, each
    gate rule with its verdict, and the alias before and after (equal when nothing moved)."""

    id: int | None = None
    name: str
    alias: str
    candidate: int
    baseline: int | None = None  # the alias's version the candidate was compared with
    outcome: Literal["promoted", "canary", "rejected", "aborted"]
    actor: str
    created_at: datetime | None = None
    before: list[tuple[int, int]] | None = None  # alias weights; None: the alias did not exist
    after: list[tuple[int, int]] | None = None
    canary_percent: int | None = None
    rules: list[RuleResult] = Field(default_factory=list)
    # "candidate" / "baseline" -> {"<eval set>.<figure>": value}
    figures: dict[str, dict[str, Any]] = Field(default_factory=dict)
    evals: dict[str, Any] = Field(default_factory=dict)  # eval set -> {"sha256", "n", ...}
    gate: dict[str, Any] = Field(default_factory=dict)  # the gate as read, with its sha256
    server: str | None = None
    note: str = ""

    @property
    def moved(self) -> bool:
        return self.outcome in ("promoted", "canary")

    @property
    def failed_rules(self) -> list[RuleResult]:
        return [r for r in self.rules if not r.passed]


def weights_text(weights: list[tuple[int, int]] | None) -> str:
    """`3`, `3:90,4:10`, or `-` for no alias (the CLI's syntax)."""
    if not weights:
        return "-"
    if len(weights) == 1:
        return str(weights[0][0])
    return ",".join(f"{v}:{w}" for v, w in weights)


def pick_weighted(weights: list[tuple[int, int]], salt: str, key: str | None) -> int:
    """Pick a version from a weighted split.

    With a key (e.g. the OpenAI `user`), the choice is a pure function of (salt, key): the same
    user keeps getting the same version while the split is unchanged. Without a key, random.
    """
    if len(weights) == 1:
        return weights[0][0]
    total = sum(w for _, w in weights)
    if key is None:
        point = random.randrange(total)
    else:
        digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") % total
    for version, weight in weights:
        if point < weight:
            return version
        point -= weight
    return weights[-1][0]  # unreachable: point < total


class RegistrySnapshot(BaseModel):
    """All versions, aliases and bases at one registry revision, for in-memory resolution."""

    revision: int
    versions: list[AdapterVersion]
    aliases: list[Alias]
    bases: list[BaseModelRecord] = Field(default_factory=list)

    _by_ref: dict[tuple[str, int], AdapterVersion] = PrivateAttr(default_factory=dict)
    _aliases: dict[tuple[str, str], Alias] = PrivateAttr(default_factory=dict)
    _latest: dict[str, AdapterVersion] = PrivateAttr(default_factory=dict)
    _names: set[str] = PrivateAttr(default_factory=set)

    def model_post_init(self, __context: Any) -> None:
        # Locals, not self._x, in the loop: private attributes go through pydantic __getattr__.
        latest: dict[str, AdapterVersion] = {}
        for v in self.versions:
            cur = latest.get(v.name)
            if v.state == "active" and (cur is None or v.version > cur.version):
                latest[v.name] = v
        self._latest = latest
        self._names = {v.name for v in self.versions}
        self._by_ref = {(v.name, v.version): v for v in self.versions}
        self._aliases = {(a.name, a.alias): a for a in self.aliases}

    def resolve(self, ref: str | Ref, key: str | None = None) -> AdapterVersion:
        """Same rules as `Registry.resolve`, answered from memory."""
        r = parse_ref(ref)
        if r.name not in self._names:
            raise not_found_name(r.name)
        if r.version is not None:
            found = self._by_ref.get((r.name, r.version))
            if found is None:
                raise not_found_version(r, sorted(v for n, v in self._by_ref if n == r.name))
            if found.state != "active":
                raise archived_error(found)
            return found
        alias = r.alias if r.alias is not None else (
            DEFAULT_ALIAS if (r.name, DEFAULT_ALIAS) in self._aliases else LATEST
        )
        if alias == LATEST:
            if r.name not in self._latest:
                raise no_active_version(r.name)
            return self._latest[r.name]
        a = self._aliases.get((r.name, alias))
        if a is None:
            raise not_found_alias(r, sorted(al for n, al in self._aliases if n == r.name))
        return self._by_ref[(r.name, pick_weighted(a.weights, f"{r.name}:{alias}", key))]


# Error builders shared by the DB and the in-memory resolvers, so both say the same thing.

def not_found_name(name: str) -> AdapterNotFound:
    return AdapterNotFound(
        f"no adapter named {name!r}; see `loraplex adapters list` for registered adapters",
        param="model",
    )


def not_found_version(ref: Ref, versions: list[int]) -> AdapterNotFound:
    have = f"versions {versions[0]}..{versions[-1]}" if versions else "no versions"
    return AdapterNotFound(f"adapter {ref.name!r} has no version {ref.version} ({have})",
                           param="model")


def not_found_alias(ref: Ref, aliases: list[str]) -> AdapterNotFound:
    have = ", ".join(aliases + [LATEST])
    return AdapterNotFound(
        f"adapter {ref.name!r} has no alias {ref.alias!r} (aliases: {have}); set it with "
        f"`loraplex adapters alias set {ref.name} {ref.alias} VERSION`",
        param="model",
    )


def no_active_version(name: str) -> AdapterNotFound:
    return AdapterNotFound(f"adapter {name!r} has no active version (all archived); push a new "
                           "one", param="model")


def archived_error(v: AdapterVersion) -> AdapterNotFound:
    return AdapterNotFound(
        f"{v.ref} is archived and no longer served; use {v.name} or another active version",
        param="model",
    )
