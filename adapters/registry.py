"""The adapter registry: the Python API used by the CLI, the trainer and the server.

    reg = Registry.open()                         # settings from LORAPLEX_* env vars
    reg.register_base("tiny", "/models/tiny")
    res = reg.push("out/adapter", "support-bot", alias="canary")
    reg.set_alias("support-bot", "prod", "3:90,4:10")
    v = reg.resolve("support-bot", key="user-42")  # sticky pick from the weighted prod alias
    reg.pull("support-bot@3", "/tmp/sb3")
    reg.record_eval("support-bot@3", "golden", {...})  # metrics["evals"]["golden"]
    reg.promotions("support-bot")                  # recorded promotion decisions

A push validates the directory against its base, writes the files once to a fresh artifact
prefix, and only then inserts the version (and moves the alias) in one transaction that also
bumps the registry revision. If anything fails after the upload, the uploaded prefix is deleted:
a failed push leaves no row and no files. One exception: when the database connection dies in
the COMMIT itself, the row may have landed; the push then checks (and succeeds if it did), and
where the database cannot answer it keeps the files (an unreferenced prefix is never read) rather
than risk a row whose files are gone. Pushing again is safe: identical content is not duplicated.

A database or artifact store that cannot be reached raises `StoreUnavailable` (503 on the
server, exit 2 on the CLI), with nothing half-written.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, insert, select, update

from loraplex.adapters import sql
from loraplex.adapters.adapter_format import check_tool_format
from loraplex.adapters.artifacts import ArtifactStore
from loraplex.adapters.errors import (
    AdapterNotFound,
    BadRequest,
    Conflict,
    StoreUnavailable,
)
from loraplex.adapters.fingerprint import inspect_base
from loraplex.adapters.records import (
    AdapterVersion,
    Alias,
    BaseModelRecord,
    PromotionDecision,
    PushResult,
    RegistrySnapshot,
    archived_error,
    no_active_version,
    not_found_alias,
    not_found_name,
    not_found_version,
    pick_weighted,
    weights_text,
)
from loraplex.adapters.refs import DEFAULT_ALIAS, LATEST, Ref, check_alias, check_name, parse_ref
from loraplex.adapters.settings import RegistrySettings
from loraplex.adapters.validate import validate_adapter_dir

V, A, B, P = sql.versions_t, sql.aliases_t, sql.bases_t, sql.promotions_t
VCOLS = (V.c.id, V.c.state, V.c.record)  # what loading a version needs
log = logging.getLogger("loraplex.registry")


class _NoChange(Exception):
    """Raised inside a write transaction to roll it back (nothing to record)."""


def parse_weights(target: int | str | list[tuple[int, int]]) -> list[tuple[int, int]]:
    """`3` / "3" -> [(3, 100)]; "3:90,4:10" or [(3, 90), (4, 10)] -> a weighted split."""
    if isinstance(target, bool):
        raise BadRequest(f"invalid alias target {target!r}", param="version")
    if isinstance(target, int):
        pairs: list[tuple[Any, Any]] = [(target, 100)]
    elif isinstance(target, str):
        pairs = []
        for part in target.split(","):
            v, sep, w = part.strip().partition(":")
            pairs.append((v, w if sep else 100))
    else:
        pairs = list(target)
    out: list[tuple[int, int]] = []
    for v, w in pairs:
        try:
            v, w = int(v), int(w)
        except (TypeError, ValueError):
            v, w = 0, 0
        if v < 1 or w < 1:
            raise BadRequest(
                f"invalid alias target {target!r}: use VERSION or VERSION:WEIGHT,... with "
                "positive integers, e.g. 3 or 3:90,4:10", param="version")
        out.append((v, w))
    if len({v for v, _ in out}) != len(out):
        raise BadRequest(f"invalid alias target {target!r}: a version appears twice",
                         param="version")
    return out


def _sha(text: str | None) -> str | None:
    return hashlib.sha256(text.encode()).hexdigest() if text is not None else None


class Registry:
    """Versions, aliases and bases in SQL; files in an `ArtifactStore`."""

    def __init__(self, url: str | None = None, artifacts_url: str | None = None, *,
                 storage_options: dict[str, Any] | None = None,
                 max_adapter_rank: int = 64, max_adapter_bytes: int = 1 << 30,
                 settings: RegistrySettings | None = None):
        s = settings or RegistrySettings()
        self.url = sql.normalize_url(url or s.resolved_registry_url())
        self.store = ArtifactStore(artifacts_url or s.resolved_artifacts_url(),
                                   storage_options if storage_options is not None
                                   else s.storage_options())
        self.max_adapter_rank = max_adapter_rank
        self.max_adapter_bytes = max_adapter_bytes
        self.engine = sql.make_engine(self.url)
        self._versions = sql.VersionCache()
        try:
            sql.migrate(self.engine)
        except BaseException:
            self.engine.dispose()
            raise

    @classmethod
    def open(cls, settings: RegistrySettings | None = None) -> Registry:
        s = settings or RegistrySettings()
        return cls(settings=s, max_adapter_rank=s.max_adapter_rank,
                   max_adapter_bytes=s.max_adapter_bytes)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- bases --------------------------------------------------------------------------------

    def register_base(self, name: str, dir: str | Path) -> BaseModelRecord:
        """Record a base model; idempotent for the same files, Conflict for a different base."""
        check_name(name, "base name")
        rec = inspect_base(name, dir)
        with sql.write_tx(self.engine) as conn:
            row = conn.execute(select(B).where(B.c.name == name)).first()
            if row is not None:
                if row.fingerprint != rec.fingerprint:
                    raise Conflict(
                        f"base {name!r} is already registered with fingerprint {row.fingerprint}, "
                        f"but {str(dir)!r} has {rec.fingerprint} (a different model config or "
                        "tokenizer); register it under a new name", param="name")
                return sql.to_base(row)
            sql.bump_revision(conn)
            now = sql.utcnow()
            conn.execute(insert(B).values(name=name, fingerprint=rec.fingerprint, created_at=now,
                                          record=rec.model_dump(mode="json")))
        return rec.model_copy(update={"created_at": now})

    def get_base(self, name: str) -> BaseModelRecord:
        with sql.connect(self.engine) as conn:
            row = conn.execute(select(B).where(B.c.name == name)).first()
        if row is None:
            raise AdapterNotFound(f"no base model named {name!r}; register it with "
                                  f"`loraplex adapters base add {name} DIR`", param="base")
        return sql.to_base(row)

    def list_bases(self) -> list[BaseModelRecord]:
        with sql.connect(self.engine) as conn:
            return [sql.to_base(r) for r in conn.execute(select(B).order_by(B.c.name))]

    def _pick_base(self, base: str | None, adapter_dir: Path) -> BaseModelRecord:
        if base is not None:
            return self.get_base(check_name(base, "base name"))
        bases = self.list_bases()
        if not bases:
            raise BadRequest("no base model is registered; register the one the adapter was "
                             "trained on: `loraplex adapters base add NAME DIR`", param="base")
        hints: set[str] = set()
        for fname, key in (("loraplex.json", "base_fingerprint"),
                           ("adapter_config.json", "base_model_name_or_path")):
            try:
                hint = json.loads((adapter_dir / fname).read_text())[key]
                hints.add(hint)
                if Path(hint).expanduser().is_dir():
                    hints.add(str(Path(hint).expanduser().resolve()))
            except (OSError, ValueError, KeyError, TypeError):
                pass
        for b in bases:
            if b.fingerprint in hints or b.name in hints or b.source_dir in hints:
                return b
        if len(bases) == 1:
            return bases[0]
        raise BadRequest("several base models are registered (" +
                         ", ".join(b.name for b in bases) + "); pass --base NAME", param="base")

    # -- push ---------------------------------------------------------------------------------

    def push(self, dir: str | Path, name: str, alias: str | None = None, base: str | None = None,
             chat_template: str | Path | None = None, description: str = "",
             tags: dict[str, str] | None = None, training: dict[str, Any] | None = None,
             metrics: dict[str, Any] | None = None, tool_format: str | None = None) -> PushResult:
        """Validate and register an adapter directory as the next version of `name`.

        `chat_template` is a file path used when the adapter brings no template of its own;
        `tool_format` (how the model writes tool calls) overrides the adapter's loraplex.json.
        Pushing content identical to an active version returns that version (created=False).
        """
        check_name(name)
        if alias is not None:
            check_alias(alias)
        check_tool_format(tool_format)
        tags = {str(k): str(v) for k, v in (tags or {}).items()}
        for meta_name, value in (("training", training), ("metrics", metrics)):
            try:
                json.dumps(value or {})
            except (TypeError, ValueError):
                raise BadRequest(f"{meta_name} must be JSON-serializable", param=meta_name) from None
        d = Path(dir).expanduser()
        base_rec = self._pick_base(base, d)
        summary = validate_adapter_dir(d, base_rec, self.max_adapter_rank, self.max_adapter_bytes)

        notes: list[str] = []
        template = summary.chat_template
        if template is not None:
            notes.append(f"chat template from the adapter's {summary.chat_template_source}")
            if chat_template is not None:
                notes.append("--chat-template ignored: the adapter brings its own template")
        elif chat_template is not None:
            try:
                template = Path(chat_template).expanduser().read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise BadRequest(f"cannot read chat template file {str(chat_template)!r}: {exc}",
                                 param="chat_template") from None
            notes.append(f"chat template from {chat_template}")
        else:
            template = base_rec.chat_template
            notes.append(f"chat template from base {base_rec.name!r}" if template
                         else "no chat template (base has none): completions only")
        stops = summary.stop_tokens if summary.stop_tokens is not None else base_rec.eos_tokens

        tool_format = tool_format or summary.tool_format
        identity = {"files": summary.files, "base": base_rec.fingerprint,
                    "chat_template": _sha(template), "stop_tokens": stops}
        if tool_format:  # only when set, so versions pushed before tool formats keep their hash
            identity["tool_format"] = tool_format
        content = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

        row_values = dict(
            name=name, base_name=base_rec.name, base_fingerprint=base_rec.fingerprint,
            content_sha256=content, peft_type=summary.peft_type, rank=summary.rank,
            alpha=summary.alpha, target_modules=summary.target_modules, chat_template=template,
            chat_template_sha256=_sha(template), stop_tokens=stops, tool_format=tool_format,
            files=summary.files,
            total_size=summary.total_size, description=description, tags=tags,
            training=training or {}, metrics=metrics or {}, state="active",
        )
        for _ in range(2):
            existing = self._find_content(name, content)
            if existing is not None and alias is None:
                return self._same(existing, None, notes)
            # Upload before the transaction so the write lock is never held during a transfer.
            uri = None if existing is not None else self.store.put(d, summary.files, name, content)
            try:
                outcome = self._commit_push(row_values, uri, alias)
            except StoreUnavailable as exc:
                if uri is not None and getattr(exc, "commit_unknown", False):
                    outcome = self._settle_unknown_commit(name, uri, alias, exc)
                elif uri is not None:
                    self.store.delete(uri)
                    raise
                else:
                    raise
            except BaseException:
                if uri is not None:
                    self.store.delete(uri)
                raise
            if outcome is None:  # the identical version was archived meanwhile: upload, retry
                continue
            version, created, alias_rec, revision = outcome
            if not created:
                if uri is not None:  # a concurrent identical push committed first
                    self.store.delete(uri)
                return self._same(version, alias_rec, notes)
            msg = f"registered {version.ref} (revision {revision})"
            if alias_rec is not None:
                msg += f"; {name}:{alias} -> {version.version}"
            return PushResult(version=version, created=True, message=msg, alias=alias_rec,
                              notes=notes)
        raise Conflict(f"push of {name!r} raced with concurrent archives twice; retry")

    def _commit_push(self, values: dict[str, Any], uri: str | None, alias: str | None
                     ) -> tuple[AdapterVersion, bool, Alias | None, int] | None:
        """Insert the version (or find its identical twin) and move the alias, atomically."""
        name = values["name"]
        try:
            with sql.write_tx(self.engine) as conn:
                revision = sql.bump_revision(conn)
                row = conn.execute(select(*VCOLS).where(
                    V.c.name == name, V.c.content_sha256 == values["content_sha256"],
                    V.c.state == "active")).first()
                if row is not None:
                    version = self._versions.get(row)
                    if alias is None:
                        raise _NoChange(version)
                    return version, False, self._set_alias_tx(
                        conn, name, alias, [(version.version, 100)]), revision
                if uri is None:
                    raise _NoChange(None)
                # Safe without retries: the revision bump above serialized all writers.
                number = (conn.execute(select(func.max(V.c.version)).where(V.c.name == name))
                          .scalar() or 0) + 1
                draft = AdapterVersion(id=1, version=number, artifact_uri=uri,
                                       created_at=sql.utcnow(), **values)
                row_id = conn.execute(insert(V).values(**sql.version_columns(draft))
                                      .returning(V.c.id)).scalar_one()
                version = draft.model_copy(update={"id": row_id})
                conn.execute(update(V).where(V.c.id == row_id)
                             .values(record=version.model_dump_json()))
                alias_rec = (self._set_alias_tx(conn, name, alias, [(number, 100)])
                             if alias else None)
                return version, True, alias_rec, revision
        except _NoChange as nc:
            found = nc.args[0]
            return None if found is None else (found, False, None, 0)

    def _settle_unknown_commit(self, name: str, uri: str, alias: str | None,
                               exc: StoreUnavailable
                               ) -> tuple[AdapterVersion, bool, Alias | None, int]:
        """The COMMIT of a push failed with the connection: did the row land? Yes: the push
        succeeded. No: undo the upload and raise. Cannot tell: keep the files (a prefix no row
        names is never read; deleting them could orphan a committed row) and raise."""
        try:
            with sql.connect(self.engine) as conn:
                row = conn.execute(select(*VCOLS).where(V.c.name == name,
                                                        V.c.artifact_uri == uri)).first()
                alias_row = (conn.execute(select(A).where(A.c.name == name, A.c.alias == alias))
                             .first() if alias and row is not None else None)
                revision = sql.get_revision(conn)
        except StoreUnavailable:
            log.warning("push of %r: the registry database failed during COMMIT and cannot be "
                        "asked whether it landed; keeping %s", name, uri)
            raise StoreUnavailable(
                f"{exc.message} (during the COMMIT of this push of {name!r}: it may or may not "
                f"have been recorded; `loraplex adapters list {name}` tells once the database "
                "is back, and pushing again is safe: identical content is not duplicated)"
            ) from exc
        if row is None:
            self.store.delete(uri)
            raise exc
        log.warning("push of %r: the COMMIT reported a lost connection but the version landed",
                    name)
        return (self._versions.get(row), True,
                sql.to_alias(alias_row) if alias_row is not None else None, revision)

    def _find_content(self, name: str, content: str) -> AdapterVersion | None:
        with sql.connect(self.engine) as conn:
            row = conn.execute(select(*VCOLS).where(
                V.c.name == name, V.c.content_sha256 == content, V.c.state == "active")).first()
        return self._versions.get(row) if row is not None else None

    @staticmethod
    def _same(v: AdapterVersion, alias: Alias | None, notes: list[str]) -> PushResult:
        msg = f"identical content is already registered as {v.ref}; no new version created"
        if alias is not None:
            msg += f"; {v.name}:{alias.alias} -> {v.version}"
        return PushResult(version=v, created=False, message=msg, alias=alias, notes=notes)

    # -- reading ------------------------------------------------------------------------------

    def revision(self) -> int:
        with sql.connect(self.engine) as conn:
            return sql.get_revision(conn)

    def list(self, name: str | None = None, include_archived: bool = False) -> list[AdapterVersion]:
        q = select(*VCOLS).order_by(V.c.name, V.c.version)
        if name is not None:
            q = q.where(V.c.name == check_name(name))
        if not include_archived:
            q = q.where(V.c.state == "active")
        with sql.connect(self.engine) as conn:
            return self._versions.get_all(conn.execute(q).all())

    def aliases(self, name: str | None = None) -> list[Alias]:
        q = select(A).order_by(A.c.name, A.c.alias)
        if name is not None:
            q = q.where(A.c.name == check_name(name))
        with sql.connect(self.engine) as conn:
            return [sql.to_alias(r) for r in conn.execute(q)]

    def show(self, ref: str | Ref) -> AdapterVersion:
        """The version a reference names now (archived versions included for `name@N`)."""
        return self.resolve(ref, include_archived=True)

    def resolve(self, ref: str | Ref, key: str | None = None,
                include_archived: bool = False) -> AdapterVersion:
        """The version `ref` names; a weighted alias picks by hash(key) (sticky), else randomly."""
        r = parse_ref(ref)
        with sql.read_tx(self.engine) as conn:
            if r.version is not None:
                row = conn.execute(select(*VCOLS).where(V.c.name == r.name,
                                                        V.c.version == r.version)).first()
                if row is None:
                    raise self._diagnose(conn, r)
                v = self._versions.get(row)
                if v.state != "active" and not include_archived:
                    raise archived_error(v)
                return v
            alias = r.alias
            weights = None
            if alias is None or alias != LATEST:
                arow = conn.execute(select(A.c.weights).where(
                    A.c.name == r.name, A.c.alias == (alias or DEFAULT_ALIAS))).first()
                if arow is not None:
                    alias = alias or DEFAULT_ALIAS
                    weights = [(int(v), int(w)) for v, w in arow.weights]
                elif alias is not None:
                    raise self._diagnose(conn, r)
            if weights is not None:
                number = pick_weighted(weights, f"{r.name}:{alias}", key)
                q = select(*VCOLS).where(V.c.name == r.name, V.c.version == number)
            else:  # latest: the newest active version
                q = (select(*VCOLS).where(V.c.name == r.name, V.c.state == "active")
                     .order_by(V.c.version.desc()).limit(1))
            row = conn.execute(q).first()
            if row is None:
                raise self._diagnose(conn, r)
            return self._versions.get(row)

    def _diagnose(self, conn: Any, r: Ref) -> AdapterNotFound:
        versions = sorted(conn.execute(select(V.c.version).where(V.c.name == r.name)).scalars())
        if not versions:
            return not_found_name(r.name)
        if r.version is not None:
            return not_found_version(r, versions)
        if r.alias is not None and r.alias != LATEST:
            names = sorted(conn.execute(select(A.c.alias).where(A.c.name == r.name)).scalars())
            return not_found_alias(r, names)
        return no_active_version(r.name)

    def snapshot(self) -> RegistrySnapshot:
        """Everything a server needs to resolve references in memory, at one revision."""
        with sql.read_tx(self.engine) as conn:
            return RegistrySnapshot(
                revision=sql.get_revision(conn),
                versions=self._versions.get_all(
                    conn.execute(select(*VCOLS).order_by(V.c.name, V.c.version)).all()),
                aliases=[sql.to_alias(r) for r in
                         conn.execute(select(A).order_by(A.c.name, A.c.alias))],
                bases=[sql.to_base(r) for r in conn.execute(select(B).order_by(B.c.name))],
            )

    # -- aliases and archive ------------------------------------------------------------------

    def set_alias(self, name: str, alias: str,
                  target: int | str | list[tuple[int, int]]) -> Alias:
        """Point `name:alias` at a version or a weighted split; one atomic row write."""
        check_name(name)
        check_alias(alias)
        weights = parse_weights(target)
        with sql.write_tx(self.engine) as conn:
            sql.bump_revision(conn)
            return self._set_alias_tx(conn, name, alias, weights)

    def _set_alias_tx(self, conn: Any, name: str, alias: str,
                      weights: list[tuple[int, int]]) -> Alias:
        states = dict(conn.execute(select(V.c.version, V.c.state).where(V.c.name == name)).all())
        if not states:
            raise not_found_name(name)
        for v, _ in weights:
            if v not in states:
                raise not_found_version(Ref(name, version=v), sorted(states))
            if states[v] != "active":
                raise Conflict(f"{name}@{v} is archived; an alias can only point to active "
                               "versions", param="version")
        now = sql.utcnow()
        stored = [[v, w] for v, w in weights]
        done = conn.execute(update(A).where(A.c.name == name, A.c.alias == alias)
                            .values(weights=stored, updated_at=now))
        if done.rowcount == 0:
            conn.execute(insert(A).values(name=name, alias=alias, weights=stored, updated_at=now))
        return Alias(name=name, alias=alias, weights=weights, updated_at=now)

    def remove_alias(self, name: str, alias: str) -> None:
        check_name(name)
        check_name(alias, "alias")
        try:
            with sql.write_tx(self.engine) as conn:
                sql.bump_revision(conn)
                if conn.execute(delete(A).where(A.c.name == name, A.c.alias == alias)).rowcount == 0:
                    raise _NoChange()
        except _NoChange:
            raise AdapterNotFound(f"adapter {name!r} has no alias {alias!r}", param="alias") from None

    def archive(self, ref: str | Ref) -> AdapterVersion:
        """Retire `name@N`: hidden from list/latest, refused as alias target and by resolve."""
        r = parse_ref(ref)
        if r.version is None:
            raise BadRequest(f"archive needs an explicit version, e.g. {r.name}@3 (got {str(r)!r})",
                             param="ref")
        try:
            with sql.write_tx(self.engine) as conn:
                sql.bump_revision(conn)
                # FOR UPDATE: a concurrent record_eval (which takes no revision lock) cannot
                # slip its metrics in between this read and the write below (PostgreSQL).
                row = conn.execute(select(*VCOLS).where(
                    V.c.name == r.name, V.c.version == r.version).with_for_update()).first()
                if row is None:
                    raise self._diagnose(conn, r)
                if row.state == "archived":
                    raise _NoChange(self._versions.get(row))
                pointing = [a.alias for a in conn.execute(select(A).where(A.c.name == r.name))
                            if any(int(v) == r.version for v, _ in a.weights)]
                if pointing:
                    raise Conflict(
                        f"{r} is still the target of alias(es) {', '.join(pointing)}; move them "
                        f"first (`loraplex adapters alias set {r.name} ALIAS VERSION`)",
                        param="ref")
                archived = self._versions.get(row).model_copy(update={"state": "archived"})
                conn.execute(update(V).where(V.c.id == row.id).values(
                    state="archived", record=archived.model_dump_json()))
                return archived
        except _NoChange as nc:
            return nc.args[0]

    # -- evaluations and promotions ------------------------------------------------------------

    def record_eval(self, ref: str | Ref, eval_set: str, result: dict[str, Any]) -> AdapterVersion:
        """Store one eval set's result on a version: `metrics["evals"][eval_set] = result`
        (replacing an earlier result for that set; the push-time metrics are kept).

        The registry revision is not bumped: servers resolve and load by files, template and
        state, never by metrics. The version row is locked for the read-modify-write (SQLite:
        the write transaction; PostgreSQL: FOR UPDATE), so concurrent results for other sets
        and an archive are not lost."""
        r = parse_ref(ref)
        if r.version is None:
            raise BadRequest(f"an eval result is stored on an explicit version, e.g. {r.name}@3 "
                             f"(got {str(r)!r})", param="ref")
        if not eval_set or not isinstance(eval_set, str) or len(eval_set) > 200:
            raise BadRequest(f"invalid eval set name {eval_set!r}", param="eval_set")
        try:
            json.dumps(result, allow_nan=False)
        except (TypeError, ValueError):
            raise BadRequest("an eval result must be JSON-serializable (no NaN)",
                             param="result") from None
        with sql.write_tx(self.engine) as conn:
            row = conn.execute(select(*VCOLS).where(
                V.c.name == r.name, V.c.version == r.version).with_for_update()).first()
            if row is None:
                raise self._diagnose(conn, r)
            v = self._versions.get(row)
            metrics = dict(v.metrics)
            evals = dict(metrics.get("evals") or {})
            evals[eval_set] = result
            metrics["evals"] = evals
            updated = v.model_copy(update={"metrics": metrics})
            conn.execute(update(V).where(V.c.id == row.id)
                         .values(record=updated.model_dump_json()))
        return updated

    def record_promotion(self, decision: PromotionDecision,
                         target: list[tuple[int, int]] | None,
                         expect: list[tuple[int, int]] | None) -> PromotionDecision:
        """Record a promotion decision and, when `target` is given (the gate passed), point
        the alias at it, in one transaction.

        `expect` is the alias as the decision saw it (None: no such alias). If the alias has
        moved since, nothing moves and the decision is recorded as `aborted`: its figures
        compared the candidate with a version the alias no longer names."""
        name, alias = check_name(decision.name), check_alias(decision.alias)
        if target is not None:
            target = parse_weights(target)
        expect_n = [(int(v), int(w)) for v, w in expect] if expect is not None else None
        with sql.write_tx(self.engine) as conn:
            if target is not None:  # an alias move: servers must see it
                sql.bump_revision(conn)
            arow = conn.execute(select(A.c.weights).where(A.c.name == name,
                                                          A.c.alias == alias)).first()
            before = [(int(v), int(w)) for v, w in arow.weights] if arow is not None else None
            outcome, note, after = decision.outcome, decision.note, before
            if target is not None and before != expect_n:
                outcome = "aborted"
                note = (f"{name}:{alias} moved during the evaluation (was "
                        f"{weights_text(expect_n)}, now {weights_text(before)}): nothing moved; "
                        "promote again to evaluate against its current version")
            elif target is not None:
                after = self._set_alias_tx(conn, name, alias, target).weights
            elif outcome in ("promoted", "canary"):
                raise BadRequest("a decision that moves the alias needs a target", param="target")
            now = sql.utcnow()
            rec = decision.model_copy(update={"id": None, "created_at": now, "before": before,
                                              "after": after, "outcome": outcome, "note": note})
            row_id = conn.execute(insert(P).values(
                name=name, alias=alias, candidate=rec.candidate, outcome=outcome,
                actor=rec.actor[:128], created_at=now, record=rec.model_dump_json(),
            ).returning(P.c.id)).scalar_one()
        return rec.model_copy(update={"id": row_id})

    def promotions(self, name: str | None = None, limit: int | None = None
                   ) -> list[PromotionDecision]:
        """Promotion decisions, newest first (of `name`, or of every adapter)."""
        q = select(P).order_by(P.c.id.desc())
        if name is not None:
            q = q.where(P.c.name == check_name(name))
        if limit is not None:
            q = q.limit(limit)
        with sql.connect(self.engine) as conn:
            return [sql.to_promotion(r) for r in conn.execute(q)]

    # -- files --------------------------------------------------------------------------------

    def fetch(self, version: AdapterVersion, dest: str | Path) -> Path:
        """Download a version's files into `dest` and verify every sha256."""
        return self.store.fetch(version, dest)

    def pull(self, ref: str | Ref, dest: str | Path) -> AdapterVersion:
        v = self.resolve(ref, include_archived=parse_ref(ref).version is not None)
        try:
            self.fetch(v, dest)
        except OSError as exc:  # writing `dest` (reading the store raises StoreUnavailable)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise BadRequest(f"no space left writing {str(dest)!r} ({v.total_size} bytes "
                                 "needed): free some space or pull elsewhere",
                                 param="dest") from None
            raise
        return v

