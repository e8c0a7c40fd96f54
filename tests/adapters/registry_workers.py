"""Process bodies for the concurrency tests (importable by name in spawn children) and helpers.

Children import only loraplex.adapters (no torch): they start in well under a second.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any


def stored_files(reg: Any) -> list[str]:
    """Every file under a registry's artifact root (what a failed push must not leave)."""
    fs, root = reg.store.fs, reg.store.root
    fs.invalidate_cache()
    if not fs.exists(root):
        return []
    # Files only: SeaweedFS keeps empty "directories", which s3fs may list as entries.
    return sorted(p for p, info in fs.find(root, detail=True).items() if info["type"] == "file")


def push_worker(url: str, artifacts: str, opts: dict | None, adapter: str, name: str,
                tag: str, count: int, barrier: Any, out: Any) -> None:
    """Push `count` distinct versions of `name` as fast as possible after the barrier."""
    from loraplex.adapters.registry import Registry

    try:
        reg = Registry(url, artifacts, storage_options=opts)
        work = Path(tempfile.mkdtemp(prefix=f"push-{tag}-"))
        dirs = []
        for i in range(count):
            d = work / f"v{i}"
            shutil.copytree(adapter, d)
            (d / "NOTES.txt").write_text(f"{tag}-{i}")  # distinct content => new version
            dirs.append(d)
        barrier.wait(timeout=60)
        got = [(reg.push(d, name, description=f"{tag}-{i}").version.version, f"{tag}-{i}")
               for i, d in enumerate(dirs)]
        reg.close()
        shutil.rmtree(work, ignore_errors=True)
        out.put(("ok", got))
    except BaseException as exc:  # report instead of dying silently
        out.put(("error", repr(exc)))


def alias_mover(url: str, artifacts: str, name: str, targets: list[str], moves: int,
                barrier: Any, out: Any, seen: Any = None, every: int = 5) -> None:
    """Move `name:prod` through `targets` in turn; report the revision each move produced.

    With `seen` (a shared int the reader sets to the last revision it read), the mover waits
    every `every` moves until the reader has caught up, so reads overlap writes however the
    two processes are scheduled; between those checkpoints both run freely.
    """
    import time

    from loraplex.adapters.registry import Registry

    try:
        reg = Registry(url, artifacts)
        barrier.wait(timeout=60)
        log = []
        for i in range(moves):
            target = targets[i % len(targets)]
            reg.set_alias(name, "prod", target)
            log.append(target)
            if seen is not None and (i + 1) % every == 0:
                revision, deadline = reg.revision(), time.monotonic() + 60
                while seen.value < revision and time.monotonic() < deadline:
                    time.sleep(0.001)
        reg.close()
        out.put(("ok", log))
    except BaseException as exc:
        out.put(("error", repr(exc)))


def open_worker(url: str, artifacts: str, barrier: Any, out: Any) -> None:
    """Open (and so migrate) a registry at the same moment as another process."""
    from loraplex.adapters.registry import Registry

    try:
        barrier.wait(timeout=60)
        reg = Registry(url, artifacts)
        out.put(("ok", reg.revision()))
        reg.close()
    except BaseException as exc:
        out.put(("error", repr(exc)))


def push_same_worker(url: str, artifacts: str, adapter: str, name: str, alias: str | None,
                     barrier: Any, out: Any) -> None:
    """Push `adapter` (the same content as the other worker) once, right after the barrier."""
    from loraplex.adapters.registry import Registry

    try:
        reg = Registry(url, artifacts)
        work = Path(tempfile.mkdtemp(prefix="push-same-"))
        d = work / "a"
        shutil.copytree(adapter, d)
        barrier.wait(timeout=60)
        res = reg.push(d, name, alias=alias)
        reg.close()
        shutil.rmtree(work, ignore_errors=True)
        out.put(("ok", (res.version.version, res.created)))
    except BaseException as exc:  # report instead of dying silently
        out.put(("error", repr(exc)))
