"""The index of a replica's adapter disk cache, and the LRU eviction that keeps it under its cap.

The cache directory holds one whole, verified copy per adapter version (named by the manager,
`name@N-<sha256 prefix>`). This module knows only entries and bytes:

- An in-memory index (entry -> bytes, least recently used first), built once at start in a
  thread and then kept by fetches and evictions, so no request walks the directory.
- `make_room` evicts least recently used entries until the index, the fetches in progress
  (`reserved`) and the incoming bytes fit `cap`, and until the disk has `need_free` bytes.
  Which entries may go is the owner's call (`evictable`: no request holds it, not loading, not
  pinned); the owner hears of each eviction (`on_evict`) before the entry's name is released.
- Everything that changes the index runs on the event loop. An eviction renames the directory
  away (one syscall, so choosing a victim and releasing its name are atomic with respect to
  requests) and deletes it in a thread; a start removes what a crash left half-deleted.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("loraplex.adapters")
# Evicted entries are renamed to `.evicting-<entry>-<random>` and deleted in a thread; the
# leading dot keeps them out of the index (and a start removes any a crash left behind).
TRASH = ".evicting-"


@dataclass
class CacheEntry:
    """One whole adapter copy in the disk cache (the index's value)."""

    nbytes: int
    int_id: int | None = None  # the version it holds, once this process has used it


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def _remove_trees(paths: list[Path]) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


class DiskCache:
    def __init__(self, directory: Path, cap: int, evictable: Callable[[CacheEntry], bool],
                 on_evict: Callable[[str, CacheEntry], None]):
        self.dir = directory
        self.cap = cap
        self._evictable = evictable
        self._on_evict = on_evict
        self.entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self.nbytes = 0  # the sum over `entries`
        self.reserved = 0  # bytes of fetches in progress (reserved by `make_room(incoming)`)
        self._trim: asyncio.Task | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    @property
    def over_cap(self) -> bool:
        return self.nbytes + self.reserved > self.cap

    async def start(self) -> None:
        for name, nbytes in await asyncio.to_thread(self._scan):
            self.entries[name] = CacheEntry(nbytes)
            self.nbytes += nbytes
        await self.make_room()  # the cap may have been lowered since the last run

    def touch(self, name: str) -> None:
        """Most recently used now (if present)."""
        if name in self.entries:
            self.entries.move_to_end(name)

    def claim(self, name: str, int_id: int) -> CacheEntry | None:
        """The entry, marked as holding version `int_id` and most recently used; None if absent.
        Call it before any await: from then on `evictable` can protect it."""
        entry = self.entries.get(name)
        if entry is not None:
            entry.int_id = int_id
            self.entries.move_to_end(name)
        return entry

    def unreserve(self, nbytes: int) -> None:
        """A fetch that `make_room(incoming=nbytes)` reserved for is over (done or failed)."""
        self.reserved -= nbytes

    def put(self, name: str, nbytes: int | None, int_id: int) -> None:
        """Record a whole copy (fetched, or found) under `name`; `nbytes` None keeps the size
        the index had for it."""
        old = self.entries.pop(name, None)
        if old is not None:
            self.nbytes -= old.nbytes
        nbytes = nbytes if nbytes is not None else (old.nbytes if old is not None else 0)
        self.entries[name] = CacheEntry(nbytes, int_id)
        self.nbytes += nbytes

    def trim_soon(self) -> None:
        """Back under the cap in a task, if over it and no trim runs: called when an entry
        stops being held (everything may have been held during concurrent loads)."""
        if self._trim is None and self.over_cap:
            self._trim = asyncio.get_running_loop().create_task(self._trim_now())

    async def _trim_now(self) -> None:
        try:
            await self.make_room()
        finally:
            self._trim = None

    def _scan(self) -> list[tuple[str, int]]:
        """(In a thread, once at start.) The whole cached copies on disk, least recently used
        first, with their sizes; removes what an eviction interrupted by a crash left."""
        found = []
        for p in self.dir.iterdir():
            if p.name.startswith(TRASH):
                shutil.rmtree(p, ignore_errors=True)
            # Only whole cached copies: not `.partial` fetches or their `.NAME.tmp-*` downloads.
            elif p.is_dir() and not p.name.endswith(".partial") and not p.name.startswith("."):
                found.append((p.stat().st_mtime, p.name, dir_bytes(p)))
        return [(name, nbytes) for _, name, nbytes in sorted(found)]

    async def make_room(self, incoming: int = 0, need_free: int = 0) -> int:
        """LRU-evict entries the owner lets go until the index plus the fetches in progress
        plus `incoming` (reserved here for the caller, which gives it back with
        `unreserve`) fit the cap, and until `need_free` bytes are free on the cache's disk.
        Returns the bytes evicted. The plan and the renames run on the event loop without an
        await between them, so no request can take an entry between its choice and its
        removal; the deletion runs in a thread."""
        free = (await asyncio.to_thread(shutil.disk_usage, self.dir)).free if need_free else 0
        total = self.nbytes + self.reserved + incoming
        self.reserved += incoming
        victims: list[str] = []
        freed = 0
        for name, e in self.entries.items():  # least recently used first
            if total - freed <= self.cap and free + freed >= need_free:
                break
            if self._evictable(e):
                victims.append(name)
                freed += e.nbytes
        trash = []
        for name in victims:
            e = self.entries.pop(name)
            self.nbytes -= e.nbytes
            self._on_evict(name, e)
            dest = self.dir / f"{TRASH}{name}-{uuid.uuid4().hex[:8]}"
            try:
                (self.dir / name).rename(dest)
                trash.append(dest)
            except FileNotFoundError:
                pass
            except OSError as exc:  # left on disk, out of the index: never read again
                log.warning("could not evict %s from the adapter cache: %s", name, exc)
        if victims:
            log.info("adapter cache: evicted %d entries (%d bytes) for %d bytes incoming",
                     len(victims), freed, incoming)
        if total - freed > self.cap:
            log.debug("adapter cache over its cap (%d > %d bytes): the rest is in use",
                      total - freed, self.cap)
        if trash:
            await asyncio.to_thread(_remove_trees, trash)
        return freed
