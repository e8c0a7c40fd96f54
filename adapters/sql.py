"""The registry's SQL side: SQLAlchemy 2 models, engine setup, migrations and row mapping.

SQLite (default, a file under LORAPLEX_HOME) and PostgreSQL (`postgresql+psycopg://...`) run
the same queries. Concurrency rests on one rule: every write transaction first bumps the single
row of `loraplex_meta` (the registry revision). On PostgreSQL that UPDATE takes a row lock held to
commit, on SQLite write transactions start with BEGIN IMMEDIATE; either way writers are
serialized, so "max(version) + 1" cannot hand two pushers the same version, an alias move is one
UPDATE of one row, and the revision a poller reads changes exactly when the data does.

When the database cannot be reached (PostgreSQL down or restarting, a SQLite write lock held
past the busy timeout, a full disk), every read and write here raises `StoreUnavailable` (HTTP
503 with Retry-After; exit 2 on the CLI) naming the database, never a raw driver error. A write
whose COMMIT itself failed is marked `commit_unknown`: the database may or may not have
recorded it, and the caller must check before undoing anything (see `Registry.push`).
A SQLite writer waits up to 60 s for another writer's lock; `?timeout=SECONDS` in the URL sets
that wait (e.g. `sqlite:////var/lib/loraplex/registry.db?timeout=5`).
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Connection,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    select,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from loraplex.adapters.errors import ConfigError, StoreUnavailable
from loraplex.adapters.records import AdapterVersion, Alias, BaseModelRecord, PromotionDecision

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
VERSION_TABLE = "loraplex_alembic_version"
_PG_MIGRATION_LOCK = 0x6C6F7261  # "lora": advisory lock id serializing concurrent upgrades
SQLITE_BUSY_TIMEOUT_S = 60.0  # how long a SQLite writer waits for another writer's lock
PG_CONNECT_TIMEOUT_S = 10  # a PostgreSQL host that does not answer fails a request in this time


class Base(DeclarativeBase):
    pass


class MetaRow(Base):
    """Single row (id=1): the registry revision, bumped by every write."""

    __tablename__ = "loraplex_meta"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    revision: Mapped[int] = mapped_column(BigInteger, nullable=False)


class BaseRow(Base):
    __tablename__ = "loraplex_bases"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    fingerprint: Mapped[str] = mapped_column(String(80), nullable=False)
    record: Mapped[dict] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class VersionRow(Base):
    """One adapter version. The columns are what queries filter on; `record` holds the whole
    `AdapterVersion` as JSON (kept in sync on archive), so loading a row is one fast parse."""

    __tablename__ = "loraplex_adapter_versions"
    __table_args__ = (
        UniqueConstraint("name", "version", name="uq_loraplex_versions_name_version"),
        Index("ix_loraplex_versions_name_content", "name", "content_sha256"),
        {"sqlite_autoincrement": True},  # ids (= vLLM lora_int_id) are never reused
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    base_name: Mapped[str] = mapped_column(ForeignKey("loraplex_bases.name"), nullable=False)
    base_fingerprint: Mapped[str] = mapped_column(String(80), nullable=False)
    content_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    artifact_uri: Mapped[str] = mapped_column(Text, nullable=False)
    total_size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    record: Mapped[str] = mapped_column(Text, nullable=False)


class AliasRow(Base):
    __tablename__ = "loraplex_aliases"
    __table_args__ = (UniqueConstraint("name", "alias", name="uq_loraplex_aliases_name_alias"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    alias: Mapped[str] = mapped_column(String(64), nullable=False)
    weights: Mapped[list] = mapped_column(JSON, nullable=False)  # [[version, weight], ...]
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class PromotionRow(Base):
    """One promotion decision (`loraplex adapters promote`), kept forever. The columns are what
    queries filter on; `record` holds the whole `PromotionDecision` as JSON."""

    __tablename__ = "loraplex_promotions"
    __table_args__ = (
        Index("ix_loraplex_promotions_name", "name", "id"),
        {"sqlite_autoincrement": True},
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    alias: Mapped[str] = mapped_column(String(64), nullable=False)
    candidate: Mapped[int] = mapped_column(Integer, nullable=False)
    outcome: Mapped[str] = mapped_column(String(16), nullable=False)
    actor: Mapped[str] = mapped_column(String(128), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    record: Mapped[str] = mapped_column(Text, nullable=False)


metadata = Base.metadata
versions_t = VersionRow.__table__
aliases_t = AliasRow.__table__
bases_t = BaseRow.__table__
meta_t = MetaRow.__table__
promotions_t = PromotionRow.__table__


# -- engine ------------------------------------------------------------------------------------

def normalize_url(url: str) -> str:
    """Accept `postgres://` / `postgresql://` and use the psycopg 3 driver we depend on."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_engine(url: str) -> Engine:
    url = normalize_url(url)
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy.exc.ArgumentError
        raise ConfigError(f"invalid registry URL {url!r}: {exc}; expected e.g. "
                          "sqlite:////path/registry.db or postgresql+psycopg://u:p@host/db") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        try:
            busy_s = float(parsed.query.get("timeout", SQLITE_BUSY_TIMEOUT_S))
        except (TypeError, ValueError):
            raise ConfigError(f"invalid registry URL {url!r}: ?timeout= must be seconds, "
                              "e.g. ?timeout=5") from None
        engine = create_engine(url, connect_args={"timeout": busy_s})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Take transaction control away from pysqlite so BEGIN IMMEDIATE is ours to emit.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout={int(busy_s * 1000)}")
            cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            immediate = conn.get_execution_options().get("loraplex_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    if parsed.get_backend_name() != "postgresql":
        raise ConfigError(f"unsupported registry URL {url!r}: use sqlite:/// or postgresql+psycopg://")
    # pre-ping: a pooled connection that died with the server (restart, failover) is replaced
    # on the next checkout instead of failing a request.
    return create_engine(url, pool_pre_ping=True,
                         connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S})


# -- unavailability ----------------------------------------------------------------------------

# What a database that is down, restarting, locked or out of disk raises (never a bad query).
_UNREACHABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError,
                sa_exc.TimeoutError)


def is_unreachable(exc: BaseException) -> bool:
    return isinstance(exc, _UNREACHABLE) or (
        isinstance(exc, sa_exc.DBAPIError) and bool(exc.connection_invalidated))


def unavailable(engine: Engine, exc: BaseException) -> StoreUnavailable:
    """The StoreUnavailable to raise for a database error `exc` (password hidden)."""
    url = engine.url.render_as_string(hide_password=True)
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    reason_s = reason[0] if reason else type(exc).__name__
    if "locked" in reason_s:
        reason_s += " (another process holds the write lock)"
    return StoreUnavailable(f"the registry database {url} is unavailable: {reason_s}; "
                            "retry when it is back")


@contextmanager
def translate_errors(engine: Engine) -> Iterator[None]:
    """Turn database unavailability inside the block into StoreUnavailable."""
    try:
        yield
    except Exception as exc:
        if is_unreachable(exc):
            raise unavailable(engine, exc) from exc
        raise


@contextmanager
def connect(engine: Engine) -> Iterator[Connection]:
    """A plain connection for reads; unavailability becomes StoreUnavailable."""
    with translate_errors(engine), engine.connect() as conn:
        yield conn


@contextmanager
def write_tx(engine: Engine) -> Iterator[Connection]:
    """A serialized write transaction whose first act bumps the revision.

    StoreUnavailable if the database is unavailable; one raised by the COMMIT itself carries
    `commit_unknown = True` (the connection died mid-commit: the write may have landed)."""
    with translate_errors(engine), engine.execution_options(loraplex_write=True).connect() as conn:
        trans = conn.begin()
        try:
            yield conn
        except BaseException:
            with suppress(Exception):  # a dead connection cannot roll back: the server does
                trans.rollback()
            raise
        try:
            trans.commit()
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            err = unavailable(engine, exc)
            err.commit_unknown = True  # type: ignore[attr-defined]
            raise err from exc


@contextmanager
def read_tx(engine: Engine) -> Iterator[Connection]:
    """A consistent read (one snapshot on PostgreSQL, one WAL snapshot on SQLite)."""
    opts = {"isolation_level": "REPEATABLE READ"} if engine.dialect.name == "postgresql" else {}
    with translate_errors(engine), engine.connect().execution_options(**opts) as conn, \
            conn.begin():
        yield conn


def migrate(engine: Engine) -> None:
    """Upgrade the schema to head; safe when several processes open the registry at once."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    script = ScriptDirectory.from_config(cfg)
    head = script.get_current_head()
    with connect(engine) as conn:  # fast path: already at head, no write lock needed
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        current = ctx.get_current_revision()
    if current == head:
        return
    if current is not None and current not in {s.revision for s in script.walk_revisions()}:
        raise ConfigError(f"the registry database is at schema revision {current!r}, newer than "
                          f"this loraplex knows (head {head!r}); upgrade loraplex")
    with write_tx(engine) as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


# -- queries -----------------------------------------------------------------------------------

def bump_revision(conn: Connection) -> int:
    conn.execute(update(meta_t).where(meta_t.c.id == 1).values(revision=meta_t.c.revision + 1))
    return get_revision(conn)


def get_revision(conn: Connection) -> int:
    return int(conn.execute(select(meta_t.c.revision).where(meta_t.c.id == 1)).scalar_one())


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _aware(dt: datetime) -> datetime:
    # SQLite drops tzinfo; every stored time is UTC.
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


class VersionCache:
    """Parsed versions by row id, each valid while the row's stored record is the one it was
    parsed from. A version's files never change, but its state (archive) and its metrics
    (`Registry.record_eval`, from any process) can; comparing the record text costs a memcmp,
    so list() and snapshot() still cost one query and no JSON parsing."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[str, AdapterVersion]] = {}

    def get(self, row: Any) -> AdapterVersion:
        hit = self._by_id.get(row.id)
        if hit is not None and hit[0] == row.record:
            return hit[1]
        v = AdapterVersion.model_validate_json(row.record)
        self._by_id[row.id] = (row.record, v)
        return v

    def get_all(self, rows: Iterable[Any]) -> list[AdapterVersion]:
        """Many rows at once. A cold parse allocates ~10 acyclic objects per version; pausing
        the cyclic GC meanwhile avoids full collections mid-loop (they tripled p95 latency)."""
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return [self.get(r) for r in rows]
        finally:
            if was_enabled:
                gc.enable()


def version_columns(v: AdapterVersion) -> dict[str, Any]:
    """Column values of a version row (everything but `id`)."""
    return dict(name=v.name, version=v.version, state=v.state, base_name=v.base_name,
                base_fingerprint=v.base_fingerprint, content_sha256=v.content_sha256,
                artifact_uri=v.artifact_uri, total_size=v.total_size, created_at=v.created_at,
                record=v.model_dump_json())


def to_alias(row: Any) -> Alias:
    return Alias(name=row.name, alias=row.alias, updated_at=_aware(row.updated_at),
                 weights=[(int(v), int(w)) for v, w in row.weights])


def to_promotion(row: Any) -> PromotionDecision:
    rec = PromotionDecision.model_validate_json(row.record)
    return rec.model_copy(update={"id": row.id, "created_at": _aware(row.created_at)})


def to_base(row: Any) -> BaseModelRecord:
    rec = BaseModelRecord.model_validate(row.record)
    return rec.model_copy(update={"created_at": _aware(row.created_at)})
