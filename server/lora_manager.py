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
)
from loraplex.adapters.fingerprint import inspect_base
from loraplex.adapters.records import AdapterVersion, BaseModelRecord, RegistrySnapshot
from loraplex.adapters.registry import Registry
from loraplex.adapters.validate import validate_adapter_dir
from loraplex.server.interface import Engine, LoraRef
from loraplex.server.metrics import Metrics
from loraplex.server.settings import ServerSettings

log = logging.getLogger("loraplex.adapters")


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
        """None for the base model; the adapter version otherwise (AdapterNotFound if none)."""
        if model == self.settings.served_model_name:
            return None
        try:
            try:
                return self.snapshot.resolve(model, key=user)
            except AdapterNotFound:
                # Maybe pushed after our last poll: look once more, now.
                if not await self.refresh():
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
            if not isinstance(exc, (AdapterInvalid, AdapterNotFound)):
                log.exception("loading %s failed", v.ref)
                exc = AdapterInvalid(f"adapter {v.ref} could not be loaded: {exc}", param="model")
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: nobody may be waiting any more
        finally:
            self._loading.pop(v.lora_int_id, None)
        self._evict_disk()

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
        """Disk cache hit, or fetch (sha256-verified) into a temp dir, validate, rename."""
        d = self._cache_path(v)
        if d.exists():
            d.touch()  # LRU by mtime
            return d
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

    def _evict_disk(self) -> None:
        dirs = [p for p in self.settings.cache_dir.iterdir() if p.is_dir() and not p.name.endswith(".partial")]
        sizes = {p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in dirs}
        total = sum(sizes.values())
        in_use = {Path(x.ref.path) for x in self.loaded.values()}
        for p in sorted(dirs, key=lambda p: p.stat().st_mtime):
            if total <= self.settings.adapter_cache_bytes:
                break
            if p in in_use:
                continue
            shutil.rmtree(p, ignore_errors=True)
            total -= sizes[p]

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
