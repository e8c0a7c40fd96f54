"""Uploaded adapter archives, unpacked safely: nothing but plain files and directories,
within the member and byte limits, or nothing at all.

An archive is read twice: once through its headers only, refusing links, devices, FIFOs,
absolute paths, `..` components, duplicates, more than `MAX_ARCHIVE_MEMBERS` members and more
than `max_bytes` declared uncompressed bytes; then extracted by our own code (no `extractall`),
regular files and directories only, with the uncompressed bytes counted again as they are
written, so an archive whose headers understate its content is stopped too. A tar's
decompressed stream is capped as a whole, so even its metadata headers cannot expand without
bound. The caller removes `dest` on any refusal.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import os
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from loraplex.adapters.errors import BadRequest, PayloadTooLarge
from loraplex.adapters.validate import CONFIG_FILE, safe_relpath

# An adapter directory holds a handful of files (config, weights, tokenizer, README).
MAX_ARCHIVE_MEMBERS = 1000
# The data of one tar metadata header (pax, GNU long name): real ones are a few hundred bytes.
MAX_TAR_METADATA_BYTES = 64 << 10
_CHUNK = 1 << 20
_FIX = "send a .tar.gz or .zip of the adapter directory's plain files and directories"
_TAR_META_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                   tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
# What a corrupt archive or compressed stream raises while being read.
_CORRUPT = (zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError, EOFError,
            gzip.BadGzipFile, NotImplementedError, RecursionError, UnicodeDecodeError)


def _show(name: str, limit: int = 120) -> str:
    text = repr(name)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(name)} characters)"


def _refuse(member: str, reason: str) -> BadRequest:
    return BadRequest(f"archive member {_show(member)} {reason}: {_FIX}", param="file")


def _too_big(member: str, total: int, cap: int, how: str) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"archive member {_show(member)} brings the uncompressed size {how} to {total} bytes, "
        f"over the limit of {cap} bytes (max_adapter_bytes): a decompression bomb, or an adapter "
        "over the limit; send a smaller adapter or raise LORAPLEX_MAX_ADAPTER_BYTES",
        param="file")


def _member_path(raw: str) -> str:
    """The member's path relative to the archive root ('' for the root itself); BadRequest
    naming the member for an absolute path, a `..` component or an unsafe name."""
    if "\x00" in raw:
        raise _refuse(raw, "has a NUL byte in its name")
    if raw.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", raw):
        raise _refuse(raw, "is an absolute path")
    if ".." in re.split(r"[/\\]", raw):
        raise _refuse(raw, "has a '..' component: it escapes the archive")
    # `tar -C dir .` writes './x'; directories end in '/'.
    parts = raw.split("/")
    while parts and parts[0] == ".":
        parts.pop(0)
    while parts and parts[-1] == "":
        parts.pop()
    rel = "/".join(parts)
    if rel and not safe_relpath(rel):
        raise _refuse(raw, "has an unsafe name (use letters, digits and ' ._+=@-' only, "
                      "no empty or '.' components, at most 255 characters)")
    return rel


@dataclass
class _Member:
    name: str  # as in the archive, for messages
    rel: str   # checked relative path ('' = the root directory)
    is_dir: bool
    size: int  # declared uncompressed size


class _Plan:
    """Header-level checks over all members, before anything is extracted."""

    def __init__(self, max_members: int, max_bytes: int):
        self.max_members, self.max_bytes = max_members, max_bytes
        self.members: list[_Member] = []
        self.total = 0
        self.files: set[str] = set()
        self.dirs: set[str] = set()

    def add(self, name: str, is_dir: bool, size: int) -> None:
        if len(self.members) >= self.max_members:
            raise _refuse(name, f"is past the limit of {self.max_members} archive members "
                          "(an adapter has a handful of files)")
        rel = _member_path(name)
        if not rel and not is_dir:
            raise _refuse(name, "is a file named like the archive root")
        if size < 0:
            raise _refuse(name, f"declares a negative size {size}")
        if not is_dir:
            self.total += size
            if self.total > self.max_bytes:
                raise _too_big(name, self.total, self.max_bytes, "declared by the headers")
        if rel:
            parts = rel.split("/")
            parents = ["/".join(parts[:i]) for i in range(1, len(parts))]
            for par in parents:
                if par in self.files:
                    raise _refuse(name, f"is inside {par!r}, which is a file in the archive")
            if rel in self.files:
                raise _refuse(name, "appears twice in the archive")
            if not is_dir and rel in self.dirs:
                raise _refuse(name, "is both a file and a directory in the archive")
            (self.dirs if is_dir else self.files).add(rel)
            self.dirs.update(parents)
        self.members.append(_Member(name, rel, is_dir, size))

    def config_dir(self) -> str:
        found = [m.rel for m in self.members
                 if not m.is_dir and m.rel.rsplit("/", 1)[-1] == CONFIG_FILE]
        if len(found) != 1:
            raise BadRequest(f"the archive must hold exactly one {CONFIG_FILE} (found "
                             f"{len(found)}{': ' + ', '.join(map(repr, found[:5])) if found else ''})"
                             f": {_FIX}", param="file")
        return found[0].rpartition("/")[0]


class _Budget:
    """Uncompressed bytes actually written, against the same cap as the headers."""

    def __init__(self, cap: int):
        self.cap, self.used = cap, 0

    def copy(self, src: IO[bytes], dest: Path, m: _Member) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        with os.fdopen(os.open(dest, flags, 0o644), "wb") as out:
            written = 0
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                self.used += len(chunk)
                if self.used > self.cap:
                    raise _too_big(m.name, self.used, self.cap, "while extracting")
                if written > m.size:
                    raise _refuse(m.name, f"expands past the {m.size} bytes its header declares")
                out.write(chunk)


# -- zip -----------------------------------------------------------------------------------------

def _zip_plan(path: Path, max_members: int, max_bytes: int) -> _Plan:
    # zipfile reads the whole central directory into objects before anything can be counted,
    # so bound it first from the end record (entry count and directory size).
    with path.open("rb") as f:
        end = zipfile._EndRecData(f)
    if end is None:
        raise BadRequest("the zip has no end-of-central-directory record (truncated?)",
                         param="file")
    entries, cd_size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
    if entries > max_members or cd_size > max_members * 2048:
        raise BadRequest(f"the zip declares {entries} members ({cd_size} bytes of directory), "
                         f"over the limit of {max_members} archive members: {_FIX}", param="file")
    plan = _Plan(max_members, max_bytes)
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode)
            if kind == stat.S_IFLNK:
                raise _refuse(info.filename, "is a symbolic link")
            if kind in (stat.S_IFCHR, stat.S_IFBLK):
                raise _refuse(info.filename, "is a device file")
            if kind == stat.S_IFIFO:
                raise _refuse(info.filename, "is a FIFO")
            if kind == stat.S_IFSOCK:
                raise _refuse(info.filename, "is a socket")
            if info.flag_bits & 0x1:
                raise _refuse(info.filename, "is encrypted")
            plan.add(info.filename, info.is_dir() or kind == stat.S_IFDIR, info.file_size)
    return plan


def _zip_extract(path: Path, dest: Path, plan: _Plan) -> None:
    budget = _Budget(plan.max_bytes)
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        if len(infos) != len(plan.members):
            raise BadRequest("the zip changed while it was read", param="file")
        for info, m in zip(infos, plan.members):
            target = dest / m.rel if m.rel else dest
            if m.is_dir:
                target.mkdir(parents=True, exist_ok=True)
                continue
            with z.open(info) as src:  # checks the CRC at its end
                budget.copy(src, target, m)


# -- tar (plain, .gz, .bz2, .xz) -----------------------------------------------------------------

class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses oversized metadata headers before tarfile reads their data into memory."""

    def _proc_member(self, tarfile_):  # tarfile's per-header hook (stable since Python 3.0)
        if self.type in _TAR_META_TYPES and self.size > MAX_TAR_METADATA_BYTES:
            raise _refuse(self.name, f"is a metadata header of {self.size} bytes, over the "
                          f"limit of {MAX_TAR_METADATA_BYTES}")
        return super()._proc_member(tarfile_)


class _CappedReader:
    """The decompressed tar stream, refused once it passes `cap` bytes."""

    def __init__(self, f: IO[bytes], cap: int):
        self.f, self.cap, self.count = f, cap, 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.cap - self.count + 1
        data = self.f.read(n)
        self.count += len(data)
        if self.count > self.cap:
            raise PayloadTooLarge(
                f"the tar stream decompresses to over {self.cap} bytes, more than the limit of "
                f"the adapter (max_adapter_bytes) plus its headers: a decompression bomb, or an "
                "adapter over the limit; send a smaller adapter or raise "
                "LORAPLEX_MAX_ADAPTER_BYTES", param="file")
        return data


@contextlib.contextmanager
def _open_tar(path: Path, plan_caps: tuple[int, int]) -> Iterator[tarfile.TarFile]:
    max_members, max_bytes = plan_caps
    # The members' data plus, per member, a header, a metadata header and its data, padding.
    per_member = 3 * tarfile.BLOCKSIZE + MAX_TAR_METADATA_BYTES
    cap = max_bytes + (max_members + 1) * per_member + 2 * tarfile.RECORDSIZE
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(path.open("rb"))
        head = raw.read(6)
        raw.seek(0)
        f: IO[bytes]
        if head[:2] == b"\x1f\x8b":
            f = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
        elif head[:3] == b"BZh":
            f = stack.enter_context(bz2.BZ2File(raw))
        elif head == b"\xfd7zXZ\x00":
            f = stack.enter_context(lzma.LZMAFile(raw))
        else:
            f = raw
        # Stream mode: read once, front to back, never seeking (nothing is skipped unread).
        t = tarfile.open(fileobj=_CappedReader(f, cap), mode="r|",  # type: ignore[arg-type]
                         tarinfo=_BoundedTarInfo, bufsize=_CHUNK)
        stack.enter_context(t)
        yield t


def _tar_kind(m: tarfile.TarInfo) -> str | None:
    """Why `m` is refused as a member type, or None for a regular file or a directory."""
    if m.issym():
        return f"is a symbolic link (to {_show(m.linkname)})"
    if m.islnk():
        return f"is a hard link (to {_show(m.linkname)})"
    if m.ischr() or m.isblk():
        return "is a device file"
    if m.isfifo():
        return "is a FIFO"
    if m.type == tarfile.GNUTYPE_SPARSE or m.issparse():
        return "is a sparse file"
    if not (m.isfile() or m.isdir()):
        return f"is not a regular file or a directory (tar type {m.type!r})"
    return None


def _tar_plan(path: Path, max_members: int, max_bytes: int) -> _Plan:
    plan = _Plan(max_members, max_bytes)
    with _open_tar(path, (max_members, max_bytes)) as t:
        for m in t:
            why = _tar_kind(m)
            if why:
                raise _refuse(m.name, why)
            plan.add(m.name, m.isdir(), m.size if m.isfile() else 0)
    if not plan.members:
        raise BadRequest(f"the archive has no members (empty, or not an archive): {_FIX}",
                         param="file")
    return plan


def _tar_extract(path: Path, dest: Path, plan: _Plan) -> None:
    budget = _Budget(plan.max_bytes)
    n = 0
    with _open_tar(path, (plan.max_members, plan.max_bytes)) as t:
        for m in t:
            if n >= len(plan.members) or m.name != plan.members[n].name or _tar_kind(m):
                raise BadRequest("the archive changed while it was read", param="file")
            pm = plan.members[n]
            n += 1
            target = dest / pm.rel if pm.rel else dest
            if pm.is_dir:
                target.mkdir(parents=True, exist_ok=True)
                continue
            src = t.extractfile(m)
            if src is None:  # only for non-regular members, refused above
                raise _refuse(m.name, "has no file data")
            budget.copy(src, target, pm)


def extract(archive: Path, dest: Path, *, max_members: int = MAX_ARCHIVE_MEMBERS,
             max_bytes: int = 1 << 30) -> Path:
    """Unpack a .zip or .tar(.gz/.bz2/.xz) of a PEFT directory into `dest` (a new directory);
    return the directory holding its adapter_config.json. BadRequest / PayloadTooLarge naming
    the member and the reason for anything but plain files and directories inside the limits.
    """
    with archive.open("rb") as f:
        head = f.read(4)
    is_zip = head in (b"PK\x03\x04", b"PK\x05\x06")
    dest.mkdir(parents=True)
    try:
        if is_zip:
            plan = _zip_plan(archive, max_members, max_bytes)
            root = plan.config_dir()
            _zip_extract(archive, dest, plan)
        else:
            try:
                plan = _tar_plan(archive, max_members, max_bytes)
            except tarfile.ReadError as exc:
                raise BadRequest(f"the upload is not a readable zip or tar (.tar, .tar.gz, .tar.bz2, "
                                 f".tar.xz) archive ({exc}): {_FIX}", param="file") from None
            root = plan.config_dir()
            _tar_extract(archive, dest, plan)
    except _CORRUPT as exc:
        raise BadRequest(f"the archive is corrupt ({type(exc).__name__}: {exc}): {_FIX}"[:500],
                         param="file") from None
    return dest / root if root else dest
