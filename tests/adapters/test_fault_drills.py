"""Registry fault drills: the database, the artifact store or a disk fails around a push.

Each test is one drill against real components (SQLite, a private PostgreSQL that is crash-stopped
and restarted, a private S3 server that is killed and restarted, a real tmpfs that fills up) and
states what it expects; docs/reliability.md has the table. The rule every drill checks: a failed
push says what is wrong (StoreUnavailable, CLI exit 2), leaves no row and no files, and the next
try, once the fault is gone, succeeds with nothing restarted.

The drills of the server (warm serving through outages, cold loads, a dead engine) are in
tests/server/test_fault_drills.py; concurrent pushes of one name in test_concurrency.py.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from registry_workers import stored_files
from sqlalchemy import event

from loraplex.adapters.cli import main as cli_main
from loraplex.adapters.errors import BadRequest, StoreUnavailable
from loraplex.adapters.registry import Registry
from tests.faults import PrivatePostgres, PrivateS3, fill, tiny_disk

Copy = Callable[..., Path]


def prefixes(reg: Registry) -> set[str]:
    """The artifact prefixes (one per pushed version attempt) present in the store."""
    return {f.split("/files/")[0].rsplit("/", 1)[-1] for f in stored_files(reg) if "/files/" in f}


def cli_push(capsys: pytest.CaptureFixture, d: Path, name: str, url: str, artifacts: str
             ) -> tuple[int, str]:
    """`loraplex adapters push` as the console script runs it: (exit status, stderr)."""
    capsys.readouterr()
    rc = cli_main(["adapters", "push", str(d), "--name", name, "--base", "tiny",
                   "--registry-url", url, "--artifacts-url", artifacts])
    return rc, capsys.readouterr().err


@contextmanager
def sqlite_write_lock(db: Path, release_after: float | None = None) -> Iterator[None]:
    """Another process's writer: BEGIN IMMEDIATE held on `db` (until the block ends, or for
    `release_after` seconds, from a timer)."""
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    timer = None
    if release_after is not None:
        timer = threading.Timer(release_after, lambda: other.execute("ROLLBACK"))
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.join()
        else:
            other.execute("ROLLBACK")
        other.close()


# -- 1. the registry database stops ------------------------------------------------------------

def test_sqlite_lock_shorter_than_the_busy_timeout_only_delays_a_push(
        tmp_path: Path, models: dict, adapter_copy: Copy) -> None:
    """Drill: another process holds SQLite's write lock for 1.5 s while we push.
    Expected: reads answer at once (WAL); the push waits for the lock, then succeeds."""
    db = tmp_path / "r.db"
    reg = Registry(f"sqlite:///{db}", str(tmp_path / "art"))
    reg.register_base("tiny", models["tiny"])
    reg.push(adapter_copy(note="1"), "bot")
    with sqlite_write_lock(db, release_after=1.5):
        t0 = time.monotonic()
        assert reg.resolve("bot").version == 1 and reg.snapshot().revision == 2
        assert time.monotonic() - t0 < 1.0, "a reader waited for the writer"
        assert reg.push(adapter_copy(note="2"), "bot").version.version == 2
        assert time.monotonic() - t0 >= 1.2  # it did wait for the lock
    reg.close()


def test_sqlite_lock_past_the_busy_timeout_fails_the_push_cleanly(
        tmp_path: Path, models: dict, adapter_copy: Copy, capsys: pytest.CaptureFixture) -> None:
    """Drill: the write lock is held past the busy timeout (`?timeout=1` in the URL).
    Expected: StoreUnavailable naming the lock, CLI exit 2, no row and no files; reads go on;
    once the lock is released the same Registry pushes."""
    db, art = tmp_path / "r.db", str(tmp_path / "art")
    url = f"sqlite:///{db}?timeout=1"
    reg = Registry(url, art)
    reg.register_base("tiny", models["tiny"])
    with sqlite_write_lock(db):
        with pytest.raises(StoreUnavailable, match="locked"):
            reg.push(adapter_copy(note="1"), "bot")
        assert reg.list() == [] and stored_files(reg) == []
        rc, err = cli_push(capsys, adapter_copy(note="1"), "bot", url, art)
        assert rc == 2 and "registry database" in err and "locked" in err, err
        assert reg.list() == [] and stored_files(reg) == []
    assert reg.push(adapter_copy(note="1"), "bot").version.version == 1
    reg.close()


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    yield pg
    pg.close()


@pytest.fixture
def pg_db(private_pg: PrivatePostgres) -> str:
    """A fresh database on the private server (each drill leaves it running)."""
    return private_pg.create_db(f"d{uuid.uuid4().hex[:10]}")


@pytest.mark.postgres
def test_postgres_killed_fails_pushes_cleanly_and_recovers(
        private_pg: PrivatePostgres, pg_db: str, tmp_path: Path, models: dict,
        adapter_copy: Copy, capsys: pytest.CaptureFixture) -> None:
    """Drill: PostgreSQL is crash-stopped (every connection cut), then started again.
    Expected: while down, reads and pushes raise StoreUnavailable (no raw driver error), the
    CLI exits 2 naming the database, nothing is written; after the restart the same Registry
    (its pool holds dead connections) pushes again."""
    art = str(tmp_path / "art")
    reg = Registry(pg_db, art)
    reg.register_base("tiny", models["tiny"])
    reg.push(adapter_copy(note="1"), "bot")
    before = prefixes(reg)
    private_pg.stop()
    try:
        for call in (lambda: reg.resolve("bot"), reg.snapshot,
                     lambda: reg.push(adapter_copy(note="2"), "bot")):
            with pytest.raises(StoreUnavailable, match="registry database postgresql"):
                call()
        assert prefixes(reg) == before
        with pytest.raises(StoreUnavailable):  # opening one (migrations) is no different
            Registry(pg_db, art)
        rc, err = cli_push(capsys, adapter_copy(note="2"), "bot", pg_db, art)
        assert rc == 2 and f"127.0.0.1:{private_pg.port}" in err and "retry" in err, err
        assert "Traceback" not in err
        assert prefixes(reg) == before
    finally:
        private_pg.start()
    assert reg.push(adapter_copy(note="2"), "bot").version.version == 2
    assert [v.version for v in reg.list("bot")] == [1, 2]
    reg.close()


@pytest.mark.postgres
def test_postgres_killed_during_the_commit_leaves_no_row_without_files(
        private_pg: PrivatePostgres, pg_db: str, tmp_path: Path, models: dict,
        adapter_copy: Copy) -> None:
    """Drill: PostgreSQL is crash-stopped at the moment a push sends COMMIT.
    Expected: StoreUnavailable that says the push may or may not have landed; the uploaded
    files are kept (deleting them could orphan a committed row); after the restart there is
    no row (it did not land), and pushing again succeeds and is served from its own files."""
    reg = Registry(pg_db, str(tmp_path / "art"))
    reg.register_base("tiny", models["tiny"])

    # SQLAlchemy's `commit` event runs just before the driver sends COMMIT.
    event.listen(reg.engine, "commit", lambda conn: private_pg.stop(), once=True)
    try:
        with pytest.raises(StoreUnavailable, match="may or may not have been recorded"):
            reg.push(adapter_copy(note="1"), "bot")
        assert len(prefixes(reg)) == 1  # kept: no row names it, so it is never read
    finally:
        private_pg.start()
    assert reg.list("bot") == []  # the COMMIT never reached the server
    v = reg.push(adapter_copy(note="1"), "bot").version
    assert v.version == 1
    reg.fetch(v, tmp_path / "out")
    assert (tmp_path / "out" / "NOTES.txt").read_text() == "1"
    reg.close()


@pytest.mark.postgres
def test_a_commit_whose_acknowledgement_is_lost_keeps_its_files(
        private_pg: PrivatePostgres, pg_db: str, tmp_path: Path, models: dict,
        adapter_copy: Copy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Drill: the COMMIT reaches PostgreSQL and lands, but the connection dies before the
    acknowledgement (injected at the driver call; once with the server then crash-stopped,
    once with it still up).
    Expected: never a row whose files were deleted. Server down: StoreUnavailable ("may or may
    not"), files kept; after the restart the row is there and its files fetch and verify.
    Server up: the push checks, finds its row, and reports success."""
    import psycopg

    reg = Registry(pg_db, str(tmp_path / "art"))
    reg.register_base("tiny", models["tiny"])
    real_commit = reg.engine.dialect.do_commit

    def lose_ack(then_crash: bool):
        def do_commit(dbapi_conn) -> None:
            monkeypatch.setattr(reg.engine.dialect, "do_commit", real_commit)
            real_commit(dbapi_conn)
            if then_crash:
                private_pg.stop()
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        monkeypatch.setattr(reg.engine.dialect, "do_commit", do_commit)

    lose_ack(then_crash=True)
    try:
        with pytest.raises(StoreUnavailable, match="may or may not have been recorded"):
            reg.push(adapter_copy(note="1"), "bot")
    finally:
        private_pg.start()
    (v1,) = reg.list("bot")  # it had landed: and its files are still there
    reg.fetch(v1, tmp_path / "v1")

    lose_ack(then_crash=False)
    res = reg.push(adapter_copy(note="2"), "bot")
    assert res.created and res.version.version == 2
    reg.fetch(res.version, tmp_path / "v2")
    assert len(prefixes(reg)) == 2
    reg.close()


# -- 2. the artifact store (S3) goes away ------------------------------------------------------

@pytest.mark.s3
def test_s3_gone_fails_pushes_cleanly_and_recovers(
        tmp_path: Path, models: dict, adapter_copy: Copy, capsys: pytest.CaptureFixture) -> None:
    """Drill: the S3 server is killed during a push (after the first file), and is down for the
    next one; then it is started again on the same data.
    Expected: StoreUnavailable naming the store, no row; a push with the store down writes
    nothing; after the restart the same Registry pushes. (The prefix the killed upload began
    cannot be removed while the store is down: no row names it, so it is never read.)
    botocore retries are cut to one attempt to keep the drill short; the server drill
    runs with the defaults."""
    s3 = PrivateS3()
    try:
        opts = {**s3.opts, "config_kwargs": {"retries": {"max_attempts": 1}}}
        reg = Registry(f"sqlite:///{tmp_path / 'r.db'}", s3.bucket("drill"), storage_options=opts)
        reg.register_base("tiny", models["tiny"])
        real_put = reg.store.fs.put_file
        calls = []

        def put_then_die(*a, **kw):
            calls.append(a)
            real_put(*a, **kw)
            s3.stop()

        reg.store.fs.put_file = put_then_die
        with pytest.raises(StoreUnavailable, match="artifact store s3://"):
            reg.push(adapter_copy(note="1"), "bot")
        del reg.store.fs.put_file
        assert len(calls) >= 2 and reg.list() == []
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match="artifact store s3://.* unavailable"):
            reg.push(adapter_copy(note="2"), "bot")
        assert time.monotonic() - t0 < 30
        assert reg.list() == []
        s3.start()
        (orphan,) = prefixes(reg)  # the killed upload's first file: no MANIFEST, no row
        v = reg.push(adapter_copy(note="2"), "bot").version
        reg.fetch(v, tmp_path / "out")
        assert [x.version for x in reg.list()] == [1] and orphan not in v.artifact_uri
        assert not reg.store.exists(v.artifact_uri.rsplit("/", 1)[0] + "/" + orphan)
        reg.close()
    finally:
        s3.close()


# -- 6. a disk fills up ------------------------------------------------------------------------

def test_artifact_disk_full_during_a_push(tmp_path: Path, models: dict,
                                          adapter_copy: Copy, capsys: pytest.CaptureFixture
                                          ) -> None:
    """Drill: the artifact store is a directory on a (real, tmpfs) disk with 4 KiB free.
    Expected: StoreUnavailable "out of space", CLI exit 2, no row, nothing left on that disk
    but the filler; after space is freed the next push succeeds."""
    with tiny_disk(tmp_path / "disk", "512k") as disk:
        url, art = f"sqlite:///{tmp_path / 'r.db'}", str(disk / "art")
        reg = Registry(url, art)
        reg.register_base("tiny", models["tiny"])
        filler = fill(disk, leave=4096)
        with pytest.raises(StoreUnavailable, match="out of space"):
            reg.push(adapter_copy(note="1"), "bot")
        rc, err = cli_push(capsys, adapter_copy(note="1"), "bot", url, art)
        assert rc == 2 and "out of space" in err, err
        assert reg.list() == [] and stored_files(reg) == []
        assert sorted(p.name for p in disk.iterdir()) == ["art", "filler"]
        filler.unlink()
        v = reg.push(adapter_copy(note="1"), "bot").version
        assert v.version == 1
        reg.close()


def test_registry_database_disk_full_during_a_push(tmp_path: Path, models: dict,
                                                   adapter_copy: Copy) -> None:
    """Drill: SQLite's database file is on a disk that fills up (its WAL truncated first, so
    the next write needs new space); artifacts elsewhere.
    Expected: StoreUnavailable "full", no row, the upload removed again; after space is freed
    the next push succeeds."""
    with tiny_disk(tmp_path / "disk", "1m") as disk:
        db = disk / "r.db"
        reg = Registry(f"sqlite:///{db}", str(tmp_path / "art"))
        reg.register_base("tiny", models["tiny"])
        reg.push(adapter_copy(note="1"), "bot")
        before = prefixes(reg)
        other = sqlite3.connect(db)
        other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        other.close()
        filler = fill(disk)
        with pytest.raises(StoreUnavailable, match="full"):
            reg.push(adapter_copy(note="2"), "bot")
        assert prefixes(reg) == before
        filler.unlink()
        assert [v.version for v in reg.list("bot")] == [1]
        assert reg.push(adapter_copy(note="2"), "bot").version.version == 2
        reg.close()


def test_pull_onto_a_full_disk(tmp_path: Path, models: dict, adapter_copy: Copy) -> None:
    """Drill: `pull` into a directory on a disk with no room for the files.
    Expected: a clear BadRequest (CLI exit 2), nothing half-written there; with room, it works."""
    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}", str(tmp_path / "art"))
    reg.register_base("tiny", models["tiny"])
    reg.push(adapter_copy(note="1"), "bot")
    with tiny_disk(tmp_path / "disk", "256k") as disk:
        filler = fill(disk, leave=2048)
        with pytest.raises(BadRequest, match="no space left"):
            reg.pull("bot", disk / "out")
        assert [p.name for p in disk.iterdir()] == ["filler"]
        filler.unlink()
        reg.pull("bot", disk / "out")
        assert (disk / "out" / "NOTES.txt").read_text() == "1"
    reg.close()
    shutil.rmtree(tmp_path / "art", ignore_errors=True)
