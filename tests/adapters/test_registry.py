"""The registry's verbs on every backend: SQLite/PostgreSQL x local dir/S3."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from registry_workers import stored_files

from loraplex.adapters.errors import AdapterInvalid, AdapterNotFound, BadRequest, Conflict
from loraplex.adapters.registry import Registry, parse_weights
from loraplex.adapters.settings import RegistrySettings
from loraplex.adapters.validate import sha256_file

Copy = Callable[..., Path]


def test_core_flow(registry: Registry, adapter_copy: Copy, tmp_path: Path,
                   request: pytest.FixtureRequest) -> None:
    db, store = request.node.callspec.params["registry"].split("-")
    assert registry.engine.dialect.name == {"sqlite": "sqlite", "postgres": "postgresql"}[db]
    assert registry.store.url.startswith({"local": "file://", "s3": "s3://"}[store])
    rev0 = registry.revision()
    v1_dir = adapter_copy(note="first")
    r1 = registry.push(v1_dir, "bot", description="first", tags={"team": "support"},
                       training={"epochs": 1}, metrics={"loss": 0.5})
    assert r1.created and r1.version.version == 1 and "registered bot@1" in r1.message
    assert r1.version.artifact_uri.startswith(registry.store.url + "/adapters/bot/")
    assert registry.revision() > rev0
    r2 = registry.push(adapter_copy(note="second"), "bot", alias="canary")
    assert r2.created and r2.version.version == 2 and r2.alias and r2.alias.alias == "canary"

    # Identical content again: same version, nothing new, and it says so.
    rev = registry.revision()
    again = registry.push(adapter_copy(note="first"), "bot")
    assert not again.created and again.version.version == 1
    assert "already registered as bot@1" in again.message
    assert registry.revision() == rev and len(registry.list()) == 2
    # ...and with an alias it only moves the alias to the existing version.
    again = registry.push(adapter_copy(note="first"), "bot", alias="stable")
    assert not again.created and again.version.version == 1 and "bot:stable -> 1" in again.message
    assert registry.resolve("bot:stable").version == 1 and len(registry.list()) == 2
    assert len(stored_files(registry)) == 2 * 5  # two versions x (4 files + manifest)
    registry.remove_alias("bot", "stable")

    # Resolution: bare name is latest until prod exists, then prod.
    assert registry.resolve("bot").version == 2
    assert registry.resolve("bot:latest").version == 2
    assert registry.resolve("bot:canary").version == 2
    registry.set_alias("bot", "prod", 1)
    assert registry.resolve("bot").version == 1
    assert registry.resolve("bot@2").version == 2
    v1 = registry.show("bot@1")
    assert (v1.description, v1.tags, v1.training, v1.metrics) == (
        "first", {"team": "support"}, {"epochs": 1}, {"loss": 0.5})
    assert v1.chat_template and v1.stop_tokens == ["<|end|>"] and v1.rank == 4
    assert v1.target_modules == ["self_attn.q_proj", "self_attn.v_proj"]
    assert v1.lora_int_id > 0 and v1.lora_int_id != registry.show("bot@2").lora_int_id

    # Pull: every file back, byte-identical and verified.
    dest = tmp_path / "pulled"
    assert registry.pull("bot:prod", dest).version == 1
    assert {p.name: sha256_file(p) for p in dest.iterdir()} == v1.files
    assert (dest / "NOTES.txt").read_text() == "first"
    with pytest.raises(Conflict, match="not empty"):
        registry.pull("bot@1", dest)

    # Archive: refused while an alias points at it, then hidden from list / latest / aliases.
    with pytest.raises(Conflict, match="alias\\(es\\) prod"):
        registry.archive("bot@1")
    registry.set_alias("bot", "prod", 2)
    assert registry.archive("bot@1").state == "archived"
    assert [v.version for v in registry.list("bot")] == [2]
    assert [v.version for v in registry.list("bot", include_archived=True)] == [1, 2]
    with pytest.raises(AdapterNotFound, match="archived"):
        registry.resolve("bot@1")
    assert registry.show("bot@1").state == "archived"
    with pytest.raises(Conflict, match="archived"):
        registry.set_alias("bot", "canary", 1)

    # The snapshot resolves like the database does.
    snap = registry.snapshot()
    assert snap.revision == registry.revision()
    for ref in ("bot", "bot:prod", "bot:canary", "bot:latest", "bot@2"):
        assert snap.resolve(ref).id == registry.resolve(ref).id
    with pytest.raises(AdapterNotFound, match="archived"):
        snap.resolve("bot@1")

    registry.remove_alias("bot", "canary")
    with pytest.raises(AdapterNotFound, match="no alias 'canary'"):
        registry.resolve("bot:canary")


def test_not_found_messages(local_registry: Registry, adapter_copy: Copy) -> None:
    local_registry.push(adapter_copy(), "bot")
    cases = {"nobot": "no adapter named 'nobot'", "bot@7": "has no version 7 (versions 1..1)",
             "bot:beta": "has no alias 'beta' (aliases: latest)"}
    for ref, fragment in cases.items():
        for resolver in (local_registry.resolve, local_registry.snapshot().resolve):
            with pytest.raises(AdapterNotFound) as info:
                resolver(ref)
            assert fragment in info.value.message
    with pytest.raises(BadRequest, match="explicit version"):
        local_registry.archive("bot")
    with pytest.raises(AdapterNotFound):
        local_registry.remove_alias("bot", "prod")


def test_weighted_alias_is_sticky(local_registry: Registry, adapter_copy: Copy) -> None:
    for i in range(3):
        local_registry.push(adapter_copy(note=str(i)), "bot")
    local_registry.set_alias("bot", "prod", "2:90,3:10")
    snap = local_registry.snapshot()
    picks = {}
    for i in range(300):
        key = f"user-{i}"
        v = local_registry.resolve("bot", key=key).version
        assert local_registry.resolve("bot", key=key).version == v  # sticky
        assert snap.resolve("bot", key=key).version == v  # same rule in memory
        picks[key] = v
    counts = Counter(picks.values())
    assert set(counts) == {2, 3} and 240 <= counts[2] <= 290  # ~90/10
    # Without a key the pick is random: both sides show up.
    assert {local_registry.resolve("bot:prod").version for _ in range(200)} == {2, 3}
    # Moving the split to a single version moves every user.
    local_registry.set_alias("bot", "prod", "3")
    assert {local_registry.resolve("bot", key=k).version for k in picks} == {3}


def test_alias_target_parsing() -> None:
    assert parse_weights(3) == [(3, 100)]
    assert parse_weights("3:90,4:10") == [(3, 90), (4, 10)]
    for bad in ("0", "3:0", "x", "3:90,3:10", "3:-1"):
        with pytest.raises(BadRequest):
            parse_weights(bad)


def test_chat_template_and_stop_sources(local_registry: Registry, adapter_copy: Copy,
                                        tmp_path: Path) -> None:
    base = local_registry.get_base("tiny")
    plain = local_registry.push(adapter_copy(note="plain"), "bot").version
    assert plain.chat_template == base.chat_template and plain.stop_tokens == ["<|end|>"]

    tpl = tmp_path / "t.jinja"
    tpl.write_text("{{ messages[0]['content'] }}")
    res = local_registry.push(adapter_copy(note="file"), "bot", chat_template=tpl)
    assert res.version.chat_template == "{{ messages[0]['content'] }}"

    d = adapter_copy(note="own")
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "OWN {{ messages }}", "eos_token": {"content": "<|user|>"}}))
    res = local_registry.push(d, "bot", chat_template=tpl)
    assert res.version.chat_template == "OWN {{ messages }}"
    assert res.version.stop_tokens == ["<|user|>"]
    assert any("--chat-template ignored" in n for n in res.notes)

    d = adapter_copy(note="trainer")
    (d / "loraplex.json").write_text(json.dumps({"base_fingerprint": base.fingerprint,
                                                 "chat_template": "T", "stop_tokens": ["<|end|>"]}))
    v = local_registry.push(d, "bot").version
    assert (v.chat_template, v.stop_tokens) == ("T", ["<|end|>"])
    assert v.chat_template_sha256 and v.chat_template_sha256 != plain.chat_template_sha256


def test_same_files_other_template_is_a_new_version(local_registry: Registry, adapter_copy: Copy,
                                                    tmp_path: Path, models: dict) -> None:
    d = adapter_copy()
    assert local_registry.push(d, "bot").version.version == 1
    local_registry.register_base("retok", models["retok"])
    tpl = tmp_path / "t.jinja"
    tpl.write_text("other")
    assert local_registry.push(d, "bot", chat_template=tpl).version.version == 2


def test_base_registration(local_registry: Registry, models: dict, tmp_path: Path) -> None:
    b = local_registry.get_base("tiny")
    assert b.num_layers == 2 and b.vocab_size == 300 and b.eos_tokens == ["<|end|>"]
    assert b.modules["self_attn.q_proj"] == (64, 64) and b.modules["mlp.down_proj"] == (128, 64)
    assert local_registry.register_base("tiny", models["tiny"]).fingerprint == b.fingerprint
    with pytest.raises(Conflict, match="already registered with fingerprint"):
        local_registry.register_base("tiny", models["retok"])
    # A re-save with another dtype/transformers version keeps the identity.
    copy = tmp_path / "tiny-copy"
    shutil.copytree(models["tiny"], copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg.update(transformers_version="0.0.1", torch_dtype="bfloat16", dtype="bfloat16")
    (copy / "config.json").write_text(json.dumps(cfg))
    assert local_registry.register_base("tiny", copy).fingerprint == b.fingerprint
    assert [x.name for x in local_registry.list_bases()] == ["tiny"]


def test_push_picks_base(make_registry: Callable[..., Registry], adapter_copy: Copy,
                         models: dict) -> None:
    reg = make_registry(register_base=False)
    with pytest.raises(BadRequest, match="no base model is registered"):
        reg.push(adapter_copy(), "bot")
    reg.register_base("wide", models["wide"])
    reg.register_base("tiny", models["tiny"])
    # adapter_config's base_model_name_or_path names the tiny dir: inferred.
    assert reg.push(adapter_copy(), "bot").version.base_name == "tiny"
    d = adapter_copy(note="x")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "somewhere/else"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadRequest, match="pass --base"):
        reg.push(d, "bot")
    assert reg.push(d, "bot", base="tiny").version.version == 2


def test_fetch_detects_corruption(registry: Registry, adapter_copy: Copy, tmp_path: Path) -> None:
    v = registry.push(adapter_copy(), "bot").version
    fs, prefix = registry.store._fs_for(v.artifact_uri)
    fs.pipe_file(f"{prefix}/files/adapter_config.json", b"{}")
    with pytest.raises(AdapterInvalid, match="adapter_config.json: sha256"):
        registry.fetch(v, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp left
    bad = v.model_copy(update={"files": {"../../etc/x": "0" * 64}})
    with pytest.raises(AdapterInvalid, match="path traversal"):
        registry.fetch(bad, tmp_path / "out2")


def test_open_from_settings(tmp_path: Path, adapter_copy: Copy, models: dict,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORAPLEX_MAX_ADAPTER_RANK", "2")
    s = RegistrySettings()
    assert s.resolved_registry_url() == f"sqlite:///{tmp_path / 'home' / 'registry.db'}"
    with Registry.open(s) as reg:
        assert reg.max_adapter_rank == 2
        reg.register_base("tiny", models["tiny"])
        with pytest.raises(AdapterInvalid, match="rank 4 exceeds the limit 2"):
            reg.push(adapter_copy(), "bot")
        assert stored_files(reg) == []
    assert (tmp_path / "home" / "registry.db").is_file()


@pytest.mark.parametrize("backend", ["sqlite-local",
                                     pytest.param("postgres-local", marks=pytest.mark.postgres)])
def test_migrations_match_models(backend: str, make_registry: Callable[..., Registry]) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from loraplex.adapters import sql

    reg = make_registry(backend)
    with reg.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": sql.VERSION_TABLE})
        assert ctx.get_current_revision() == "0002"  # head: 0002_promotions
        assert compare_metadata(ctx, sql.metadata) == []
