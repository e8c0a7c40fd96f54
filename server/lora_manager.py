"""Which adapter a request names, and getting it into the engine without blocking anyone.

- Resolution is answered from an in-memory registry snapshot, refreshed by a poller when the
  registry revision moves (one cheap query every `poll_interval_s`). A name the snapshot does
  not know triggers one immediate refresh, so a just-pushed adapter is served without waiting
  for the next poll.
- Loading: local disk cache (content-addressed directory per version, sha256-verified by the
  registry's fetch, LRU-evicted past `adapter_cache_bytes`), validation against the served base
  and the engine's `max_lora_rank`, then `engine.add_lora`. Concurrent first requests for one
  version share one load (one future per version); loads run in threads and never hold a lock
  that other adapters' requests need.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.adapters.errors import (
    AdapterIncompatible,
    AdapterInvalid,
    AdapterNotFound,
    LoraplexError,
    NotReady,
    StoreUnavailable,
)
from loraplex.adapters.fingerprint import inspect_base
from loraplex.adapters.records import AdapterVersion, BaseModelRecord, RegistrySnapshot
from loraplex.adapters.registry import Registry
from loraplex.adapters.validate import validate_adapter_dir
from loraplex.server.interface import Engine, LoraRef
from loraplex.server.metrics import Metrics
from loraplex.server.settings import ServerSettings

log = logging.getLogger("loraplex.adapters")
# How long a request naming an unknown adapter waits for the registry before a 503 (a database
# that hangs instead of refusing must not hang requests).
LOOKUP_TIMEOUT_S = 5.0


@dataclass
class _Loaded:
    ref: LoraRef
    version: AdapterVersion
    pinned: bool = False
    last_used: float = field(default_factory=time.monotonic)


class AdapterManager:
    def __init__(self, settings: ServerSettings, registry: Registry, engine: Engine, metrics: Metrics):
        self.settings = settings
        self.registry = registry
        self.engine = engine
        self.metrics = metrics
        self.base: BaseModelRecord = inspect_base(settings.base, settings.model)
        self.snapshot = RegistrySnapshot(revision=-1, versions=[], aliases=[])
        self.loaded: dict[int, _Loaded] = {}  # by lora int id
        self._loading: dict[int, asyncio.Future[LoraRef]] = {}
        self._refresh_lock = asyncio.Lock()
        self._poller: asyncio.Task | None = None
        self.registry_ok = False
        settings.cache_dir.mkdir(parents=True, exist_ok=True)

    # -- registry view ------------------------------------------------------------------
    async def refresh(self, force: bool = False) -> bool:
        """Re-read the snapshot if the revision moved. Returns whether it changed."""
        async with self._refresh_lock:
            was_down = not self.registry_ok and self.snapshot.revision >= 0  # not the first
            try:
                rev = await asyncio.to_thread(self.registry.revision)
                if rev == self.snapshot.revision and not force:
                    self.registry_ok = True
                    return False
                self.snapshot = await asyncio.to_thread(self.registry.snapshot)
                self.registry_ok = True
            except Exception as exc:  # keep serving from the cached view
                if self.registry_ok:
                    log.warning("registry unreachable, serving from revision %s: %s",
                                self.snapshot.revision, exc)
                self.registry_ok = False
                return False
            finally:
                if was_down and self.registry_ok:
                    log.info("registry reachable again (revision %s)", self.snapshot.revision)
        self.metrics.registry_revision.set(self.snapshot.revision)
        return True

    async def start(self) -> None:
        await self.refresh(force=True)
        self._poller = asyncio.create_task(self._poll())
        for ref in self.settings.preload:
            version = await self.resolve(ref, None)
            if version is not None:
                await self.pin(version)

    async def stop(self) -> None:
        if self._poller:
            self._poller.cancel()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            await self.refresh()

    async def resolve(self, model: str, user: str | None) -> AdapterVersion | None:
        """None for the base model; the adapter version otherwise (AdapterNotFound if none).

        StoreUnavailable (503) if the snapshot does not know `model` and the registry cannot
        be asked: it may have been pushed since, so "not found" would be a guess."""
        if model == self.settings.served_model_name:
            return None
        try:
            try:
                return self.snapshot.resolve(model, key=user)
            except AdapterNotFound as not_found:
                # Maybe pushed after our last poll: look once more, now.
                try:
                    changed = await asyncio.wait_for(self.refresh(), LOOKUP_TIMEOUT_S)
                except asyncio.TimeoutError:
                    changed = False
                    self.registry_ok = False
                if not self.registry_ok:
                    raise StoreUnavailable(
                        f"{model!r} is not in this server's registry view (revision "
                        f"{self.snapshot.revision}) and the registry database cannot be reached "
                        "to look it up; retry shortly") from not_found
                if not changed:
                    raise
                return self.snapshot.resolve(model, key=user)
        except LoraplexError as exc:
            exc.param = "model"  # the request field that named it
            raise

    # -- loading --------------------------------------------------------------------------
    async def ensure_loaded(self, v: AdapterVersion) -> LoraRef:
        hit = self.loaded.get(v.lora_int_id)
        if hit is not None:
            hit.last_used = time.monotonic()
            self.metrics.cache_hits.labels(v.name, str(v.version)).inc()
            return hit.ref
        fut = self._loading.get(v.lora_int_id)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._loading[v.lora_int_id] = fut
            asyncio.create_task(self._load(v, fut))
        # shield: one client giving up must not cancel the load the others wait for.
        return await asyncio.shield(fut)

    async def _load(self, v: AdapterVersion, fut: asyncio.Future) -> None:
        t0 = time.perf_counter()
        labels = (v.name, str(v.version))
        try:
            if not getattr(self.engine, "ready", True):
                raise RuntimeError("the engine is not running")  # no download for nothing
            self._check_compatible(v)
            path = await asyncio.to_thread(self._local_copy, v)
            ref = LoraRef(name=v.name, version=v.version, int_id=v.lora_int_id, path=str(path))
            await self.engine.add_lora(ref)
            self.loaded[v.lora_int_id] = _Loaded(ref=ref, version=v)
            self.metrics.load_seconds.labels(*labels).observe(time.perf_counter() - t0)
            self.metrics.loads.labels(*labels, "ok").inc()
            log.info("loaded %s in %.0f ms", v.ref, 1000 * (time.perf_counter() - t0))
            fut.set_result(ref)
        except Exception as exc:
            self.metrics.loads.labels(*labels, "error").inc()
            exc = self._load_error(v, exc)
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: nobody may be waiting any more
        finally:
            self._loading.pop(v.lora_int_id, None)
        self._evict_disk()

    def _load_error(self, v: AdapterVersion, exc: Exception) -> LoraplexError:
        """What a request waiting for a failed load is told."""
        if isinstance(exc, (AdapterInvalid, AdapterNotFound, NotReady)):
            # the adapter itself (400 / 404), or the store or cache disk (503, retry)
            log.warning("loading %s failed: %s", v.ref, exc.message)
            exc.param = "model"  # the request field that named it
            return exc
        if not getattr(self.engine, "ready", True):
            log.error("loading %s failed: the engine is not running (%s)", v.ref, exc)
            return NotReady(f"adapter {v.ref} cannot be loaded: the inference engine is not "
                            "running", param="model")
        log.exception("loading %s failed", v.ref, exc_info=exc)
        return AdapterInvalid(f"adapter {v.ref} could not be loaded: {exc}", param="model")

    def _check_compatible(self, v: AdapterVersion) -> None:
        problems = []
        if v.base_fingerprint != self.base.fingerprint:
            problems.append(
                f"it was registered for base {v.base_name!r} ({v.base_fingerprint}), this server "
                f"serves {self.base.name!r} ({self.base.fingerprint}): send it to a server of that base")
        if v.rank > self.settings.max_lora_rank:
            problems.append(
                f"rank {v.rank} is over this server's max_lora_rank {self.settings.max_lora_rank}: "
                "retrain with a lower rank or raise LORAPLEX_MAX_LORA_RANK")
        if problems:
            raise AdapterIncompatible(f"adapter {v.ref} cannot be served here", problems=problems,
                                      param="model")

    def _cache_path(self, v: AdapterVersion) -> Path:
        return self.settings.cache_dir / f"{v.name}@{v.version}-{v.content_sha256[:16]}"

    def _local_copy(self, v: AdapterVersion) -> Path:
        """Disk cache hit, or fetch (sha256-verified) into a temp dir, validate, rename.

        Nothing but a whole, verified copy ever appears under its cache name; a failed fetch
        leaves nothing. A full disk evicts unused cached adapters and tries once more."""
        d = self._cache_path(v)
        if d.exists():
            d.touch()  # LRU by mtime
            return d
        try:
            return self._fetch_into_cache(v, d)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            freed = self._evict_disk(need_free=v.total_size + (1 << 16))
            log.warning("adapter cache %s is full loading %s: evicted %d bytes, retrying",
                        self.settings.cache_dir, v.ref, freed)
        try:
            return self._fetch_into_cache(v, d)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise NotReady(f"adapter {v.ref} cannot be loaded: this server's adapter cache "
                           f"disk ({self.settings.cache_dir}) is full; retry shortly") from exc

    def _fetch_into_cache(self, v: AdapterVersion, d: Path) -> Path:
        tmp = d.with_name(d.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self.registry.fetch(v, tmp)
            validate_adapter_dir(tmp, self.base, max_rank=self.settings.max_lora_rank,
                                 max_bytes=self.settings.max_adapter_bytes)
            tmp.rename(d)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return d

    def _evict_disk(self, need_free: int = 0) -> int:
        """LRU-evict cached adapters not in use: down to `adapter_cache_bytes`, and further
        until `need_free` bytes are free on the cache's disk. Returns the bytes removed."""
        cache = self.settings.cache_dir
        # Only whole cached copies: not `.partial` fetches or their `.NAME.tmp-*` downloads.
        dirs = [p for p in cache.iterdir() if p.is_dir() and not p.name.endswith(".partial")
                and not p.name.startswith(".")]
        sizes = {p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in dirs}
        total = sum(sizes.values())
        in_use = {Path(x.ref.path) for x in list(self.loaded.values())}  # runs in a thread
        removed = 0
        for p in sorted(dirs, key=lambda p: p.stat().st_mtime):
            if total <= self.settings.adapter_cache_bytes and (
                    not need_free or shutil.disk_usage(cache).free >= need_free):
                break
            if p in in_use:
                continue
            shutil.rmtree(p, ignore_errors=True)
            total -= sizes[p]
            removed += sizes[p]
        return removed

    # -- admin verbs ----------------------------------------------------------------------
    async def pin(self, v: AdapterVersion) -> LoraRef:
        ref = await self.ensure_loaded(v)
        await self.engine.pin_lora(ref)
        self.loaded[v.lora_int_id].pinned = True
        return ref

    async def unpin(self, v: AdapterVersion) -> None:
        # vLLM has no unpin: drop and re-add keeps the adapter but releases the pin.
        hit = self.loaded.get(v.lora_int_id)
        if hit is None or not hit.pinned:
            return
        await self.engine.remove_lora(hit.ref)
        await self.engine.add_lora(hit.ref)
        hit.pinned = False

    async def unload(self, v: AdapterVersion) -> bool:
        hit = self.loaded.pop(v.lora_int_id, None)
        if hit is None:
            return False
        await self.engine.remove_lora(hit.ref)
        return True

    async def update_residency(self) -> None:
        """Refresh the `loraplex_adapter_resident` gauge; /metrics calls it before rendering.

        Only there: the gauge is read nowhere else, and the engine query is a worker RPC that,
        run after a load, would queue ahead of the request that waited for it (P3 measured it).

        accelerator / host come from the engine itself: vLLM moves adapters between its
        `max_loras` batch slots and its `max_cpu_loras` host LRU on its own, so the server's
        `loaded` map says what was handed over, not where it is now. disk is the local cache.
        """
        try:
            engine_view = await asyncio.wait_for(self.engine.lora_residency(), timeout=2.0)
        except Exception:  # a slow or dead engine must not break /metrics
            engine_view = None
        if engine_view is None:  # the engine cannot tell: report what we handed it
            engine_view = {i: {"host"} for i in self.loaded}
        on_disk = {p.name for p in self.settings.cache_dir.iterdir() if p.is_dir()}
        tiers: dict[str, list[tuple[str, int]]] = {"accelerator": [], "host": [], "disk": []}
        for v in self.snapshot.versions:
            for tier in sorted(engine_view.get(v.lora_int_id, ())):
                tiers[tier].append((v.name, v.version))
            if self._cache_path(v).name in on_disk:
                tiers["disk"].append((v.name, v.version))
        self.metrics.set_residency(tiers)
