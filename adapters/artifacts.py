"""The artifact store: adapter files on a local disk or any fsspec URL (s3://bucket/prefix).

Layout, one immutable prefix per pushed version, never written twice:

    <root>/adapters/<name>/<content sha[:12]>-<random>/files/<relpath>
    <root>/adapters/<name>/<content sha[:12]>-<random>/MANIFEST.json   (written last)

The random part makes every push attempt write to a fresh prefix, so concurrent pushers never
touch each other's files and a failed attempt can delete exactly what it wrote. On a local disk
the prefix is assembled under <root>/tmp/ and renamed into place (atomic); on object stores each
object appears whole and MANIFEST.json is written last. The registry row is the commit: a prefix
without a row is garbage from a crashed push and is never read.

`fetch` downloads into a temp directory beside the destination, verifies every file's sha256
against the registry record and only then renames it into place.

Failures: a store that cannot be reached or is out of space raises `StoreUnavailable` (503,
retry later), after removing whatever the failed call wrote; a file missing from the store or
whose bytes do not match the recorded sha256 raises `AdapterInvalid` naming each file (the fix:
archive that version, then push the adapter again). A local destination that fills up during `fetch` raises the
OSError (ENOSPC) after the partial download is removed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from loraplex.adapters.errors import AdapterInvalid, Conflict, LoraplexError, StoreUnavailable
from loraplex.adapters.records import AdapterVersion
from loraplex.adapters.validate import safe_relpath

MANIFEST = "MANIFEST.json"
CHUNK = 1 << 20
log = logging.getLogger("loraplex.registry")
_FULL = (errno.ENOSPC, errno.EDQUOT)


class ArtifactStore:
    """Write-once adapter artifacts under one fsspec root."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.storage_options = dict(storage_options or {})
        if "://" not in url:  # a plain local path
            url = str(Path(url).expanduser().resolve())
        self.fs, root = fsspec.core.url_to_fs(url, **self.storage_options)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = root.rstrip("/")
        self.url = self.fs.unstrip_protocol(self.root)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    def _unavailable(self, doing: str, exc: BaseException) -> StoreUnavailable:
        reason = str(exc).strip().splitlines()
        reason_s = reason[0] if reason else type(exc).__name__
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return StoreUnavailable(f"the artifact store {self.url} is out of space {doing}: "
                                    f"{reason_s}; free space there, then retry")
        return StoreUnavailable(f"the artifact store {self.url} is unavailable {doing}: "
                                f"{type(exc).__name__}: {reason_s}; retry when it is back")

    # -- writing ------------------------------------------------------------------------------

    def put(self, src_dir: str | Path, files: dict[str, str], name: str, content_sha: str) -> str:
        """Copy `files` (relpath -> sha256) from `src_dir` to a fresh prefix; return its URI.

        On any failure the partial prefix is removed before the error propagates.
        """
        src = Path(src_dir)
        final = f"{self.root}/adapters/{name}/{content_sha[:12]}-{uuid.uuid4().hex[:8]}"
        target = f"{self.root}/tmp/{uuid.uuid4().hex}" if self.local else final
        manifest = {
            "format": "loraplex-artifact-v1",
            "name": name,
            "content_sha256": content_sha,
            "files": {rel: {"sha256": sha, "size": (src / rel).stat().st_size}
                      for rel, sha in sorted(files.items())},
        }
        try:
            for rel in sorted(files):
                dst = f"{target}/files/{rel}"
                if self.local:
                    self.fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
                self.fs.put_file(str(src / rel), dst)
            self.fs.pipe_file(f"{target}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
            if self.local:
                os.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
                os.rename(target, final)
        except BaseException as exc:
            self._rm_quietly(target)
            if isinstance(exc, Exception) and not isinstance(exc, LoraplexError):
                raise self._unavailable(f"writing {name!r}", exc) from exc
            raise
        return self.fs.unstrip_protocol(final)

    def delete(self, artifact_uri: str) -> bool:
        """Remove a prefix written by `put` (only used to undo a push that did not commit).

        Best effort, never raises: it runs while another error is on its way to the user, and
        a prefix no registry row names is never read. False (and a warning) if it stayed."""
        try:
            fs, path = self._fs_for(artifact_uri)
            self._rm(path, fs)
            return True
        except Exception as exc:
            log.warning("could not remove the unregistered artifact %s (%s: %s); it is never "
                        "read and can be deleted by hand", artifact_uri, type(exc).__name__, exc)
            return False

    def _rm_quietly(self, path: str) -> None:
        try:
            self._rm(path)
        except Exception as exc:
            log.warning("could not remove the partial upload %s (%s: %s); it is never read",
                        path, type(exc).__name__, exc)

    def _rm(self, path: str, fs: Any = None) -> None:
        fs = fs or self.fs
        try:
            if fs.exists(path):
                fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        if fs is self.fs and self.local:
            # Drop now-empty parents (adapters/<name>/, tmp/) so a failed push leaves no trace.
            parent = Path(path).parent
            while parent != Path(self.root) and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent

    # -- reading ------------------------------------------------------------------------------

    def _fs_for(self, uri: str) -> tuple[Any, str]:
        if uri.startswith(self.url + "/"):
            return self.fs, self.root + uri[len(self.url):]
        fs, path = fsspec.core.url_to_fs(uri, **(self.storage_options if "://" in uri
                                                 and not uri.startswith("file:") else {}))
        return fs, path

    def exists(self, artifact_uri: str) -> bool:
        fs, path = self._fs_for(artifact_uri)
        try:
            return fs.exists(f"{path}/{MANIFEST}")
        except Exception as exc:
            raise self._unavailable(f"checking {artifact_uri}", exc) from exc

    def fetch(self, version: AdapterVersion, dest: str | Path) -> Path:
        """Download `version` into `dest` (absent or empty) and verify every sha256."""
        dest = Path(dest).expanduser()
        bad = [rel for rel in version.files if not safe_relpath(rel)]
        if bad:
            raise AdapterInvalid(f"{version.ref}: unsafe file names in the registry record",
                                 problems=[f"{rel!r}: refused (path traversal)" for rel in bad])
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise Conflict(f"destination {str(dest)!r} exists and is not empty; "
                           "pick a new directory or remove it")
        fs, prefix = self._fs_for(version.artifact_uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
        problems: list[str] = []
        try:
            for rel, want in sorted(version.files.items()):
                out = tmp / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                got = self._copy_verified(fs, f"{prefix}/files/{rel}", out, version)
                if got is None:
                    problems.append(f"{rel}: missing from {version.artifact_uri}")
                elif got != want:
                    problems.append(f"{rel}: sha256 {got} but the registry recorded "
                                    f"{want}; the stored artifact is corrupt")
            if problems:
                # Pushing the same files again would return this very version (identical
                # content is deduplicated among active versions): archive it first.
                raise AdapterInvalid(
                    f"{version.ref}: artifact failed verification; archive this version "
                    f"(`loraplex adapters archive {version.ref}`) and push the adapter again",
                    problems=problems)
            if dest.exists():
                dest.rmdir()
            os.rename(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def _copy_verified(self, fs: Any, src_path: str, out: Path, version: AdapterVersion
                       ) -> str | None:
        """Copy one stored file to `out`; its sha256, or None if the store does not have it.

        Reading the store can fail (StoreUnavailable); writing `out` raises its OSError."""
        h = hashlib.sha256()
        try:
            src = fs.open(src_path, "rb")
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._unavailable(f"reading {version.ref}", exc) from exc
        with src, out.open("wb") as dst:
            while True:
                try:
                    chunk = src.read(CHUNK)
                except FileNotFoundError:  # deleted while we read it
                    return None
                except Exception as exc:
                    raise self._unavailable(f"reading {version.ref}", exc) from exc
                if not chunk:
                    return h.hexdigest()
                h.update(chunk)
                dst.write(chunk)
