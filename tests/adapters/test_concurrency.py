"""Concurrent writers and readers across processes (multiprocessing, spawn).

- Two processes pushing versions of one name at once get distinct versions and lose nothing.
- Two processes pushing the same content under one name at once get one version between them
  (one creates it, the other is told it exists) and leave one artifact prefix, not two.
- While another process moves an alias back and forth, readers only ever see whole states:
  the alias target always matches the revision it was read with, and always exists.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
from collections.abc import Callable
from pathlib import Path

import pytest
import registry_workers

from loraplex.adapters.registry import Registry

DBS = [pytest.param("sqlite-local", id="sqlite"),
       pytest.param("postgres-local", id="postgres", marks=pytest.mark.postgres)]


def _collect(out: mp.Queue, procs: list, n: int) -> list:
    results = []
    for _ in range(n):
        try:
            status, value = out.get(timeout=120)
        except queue.Empty:
            pytest.fail("a worker process did not report in 120 s")
        assert status == "ok", value
        results.append(value)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return results


@pytest.mark.parametrize("backend", DBS)
def test_concurrent_first_open_migrates_once(backend: str, request: pytest.FixtureRequest,
                                             tmp_path: Path) -> None:
    url = (request.getfixturevalue("pg_url") if backend.startswith("postgres")
           else f"sqlite:///{tmp_path / 'fresh.db'}")
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=registry_workers.open_worker,
                         args=(url, str(tmp_path / "art"), barrier, out)) for _ in range(3)]
    for p in procs:
        p.start()
    assert _collect(out, procs, 3) == [0, 0, 0]  # all opened, schema created once
    with Registry(url, str(tmp_path / "art")) as reg:
        assert reg.revision() == 0 and reg.list() == []


@pytest.mark.parametrize("backend", DBS)
def test_concurrent_pushes_get_distinct_versions(backend: str, make_registry: Callable[...,
                                                 Registry], models: dict, tmp_path: Path) -> None:
    reg = make_registry(backend)
    ctx = mp.get_context("spawn")
    count = 5
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=registry_workers.push_worker,
                         args=(reg.url, reg.store.url, None, str(models["adapter"]), "bot", tag,
                               count, barrier, out)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    results = _collect(out, procs, 2)

    pushed = [pair for r in results for pair in r]
    versions = sorted(v for v, _ in pushed)
    assert versions == list(range(1, 2 * count + 1))  # distinct, dense, nothing skipped
    rows = {v.version: v for v in reg.list("bot")}
    assert len(rows) == 2 * count
    for number, desc in pushed:  # each process's write landed on the version it was told
        assert rows[number].description == desc
    assert len({v.lora_int_id for v in rows.values()}) == 2 * count
    assert len({v.artifact_uri for v in rows.values()}) == 2 * count
    for v in list(rows.values())[:3]:  # artifacts intact and verifiable
        reg.fetch(v, tmp_path / f"v{v.version}")
        assert (tmp_path / f"v{v.version}" / "NOTES.txt").read_text() == v.description


@pytest.mark.parametrize("backend", DBS)
def test_concurrent_pushes_of_the_same_content_make_one_version(
        backend: str, make_registry: Callable[..., Registry], models: dict, tmp_path: Path
) -> None:
    """Fault drill 7 (docs/reliability.md): the same adapter pushed twice at once (a retried
    CI job racing the first run). Expected: one version, created by one push; the other is told
    it exists (alias moved all the same); exactly one artifact prefix; it fetches and verifies."""
    from registry_workers import stored_files

    reg = make_registry(backend)
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=registry_workers.push_same_worker,
                         args=(reg.url, reg.store.url, str(models["adapter"]), "bot", "prod",
                               barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = sorted(_collect(out, procs, 2), key=lambda r: not r[1])
    assert results == [(1, True), (1, False)]
    (v,) = reg.list("bot")
    assert reg.resolve("bot:prod").version == 1
    files = stored_files(reg)
    assert len({f.split("/files/")[0] for f in files if "/files/" in f}) == 1, files
    reg.fetch(v, tmp_path / "v1")


@pytest.mark.parametrize("backend", DBS)
def test_alias_moves_are_atomic_for_readers(backend: str, make_registry: Callable[..., Registry],
                                            adapter_copy: Callable[..., Path]) -> None:
    reg = make_registry(backend)
    for i in range(3):
        reg.push(adapter_copy(note=str(i)), "bot")
    reg.set_alias("bot", "prod", 1)
    targets = ["1:30,2:70", "3"]  # a split, then a plain version
    expected = {tuple(map(tuple, [(1, 30), (2, 70)])), ((3, 100),)}
    rev0 = reg.revision()
    moves = 40

    ctx = mp.get_context("spawn")
    barrier, out, seen = ctx.Barrier(2), ctx.Queue(), ctx.Value("q", rev0)
    proc = ctx.Process(target=registry_workers.alias_mover,
                       args=(reg.url, reg.store.url, "bot", targets, moves, barrier, out, seen))
    proc.start()
    barrier.wait(timeout=60)
    seen_revisions = set()
    while True:
        snap = reg.snapshot()
        (alias,) = [a for a in snap.aliases if a.alias == "prod"]
        k = snap.revision - rev0  # the mover is the only writer: revision k <=> k-th move
        if k == 0:
            assert alias.weights == [(1, 100)]
        else:
            assert alias.target == targets[(k - 1) % 2], (snap.revision, alias)
        assert tuple(alias.weights) in expected | {((1, 100),)}
        v = snap.resolve("bot", key=f"u{k}")
        assert v.version in {w for w, _ in alias.weights}
        # The database path answers from a whole state too.
        assert reg.resolve("bot:prod", key="x").version in {1, 2, 3}
        seen_revisions.add(snap.revision)
        seen.value = snap.revision  # lets the mover pause every few moves until we caught up
        if k >= moves:
            break
    _collect(out, [proc], 1)
    assert reg.revision() == rev0 + moves
    # The reader really overlapped the writer: the mover waits for it at every 5th move.
    assert len(seen_revisions) > 3
