"""Which adapter a request names, and getting it into the engine without blocking anyone.

- Resolution is answered from an in-memory registry snapshot, refreshed by a poller when the
  registry revision moves (one cheap query every `poll_interval_s`). A name the snapshot does
  not know triggers one immediate refresh, so a just-pushed adapter is served without waiting
  for the next poll.
- Loading: local disk cache (content-addressed directory per version, sha256-verified by the
  registry's fetch), validation against the served base and the engine's `max_lora_rank`, then
  `engine.add_lora`. Concurrent first requests for one version share one load (one future per
  version); loads run in threads and never hold a lock that other adapters' requests need.
- The disk cache keeps `adapter_cache_bytes` (its index and LRU eviction: `disk_cache.py`).
  Before a fetch, least recently used entries are evicted until the new one fits. An entry
  may go only when no request holds its version (`acquire` .. `release`: from admission until
  the response is done, streams included), it is not loading and not pinned: vLLM re-reads an
  adapter's files from `LoraRef.path` when it has dropped it from its host cache and a request
  needs it again. Evicting drops the version from `loaded`, so its next request loads it again
  (fetch, then `add_lora`, which for an id vLLM still holds only touches it).
- Prefetch: a request for an adapter that is probably not in vLLM's host LRU announces it to
  the engine first, which reads its files on a worker thread while the request waits for a
  slot, not inside the step that schedules it (`_prefetch`; the worker side is in
  engine/core.py; `lora_prefetch` turns it off).
- Automatic pins (`auto_pin`, off by default): the adapters most requested over the last
  `auto_pin_window` requests are pinned in the engine's host cache, so their requests never
  wait for a read; they follow traffic (`_rebalance`) and yield to an operator's pins.
- `update_residency` (each /metrics scrape) also sets the LoRA-affinity series the Gateway API
  Inference Extension's endpoint picker reads (`vllm:lora_requests_info`): see
  `lora_requests_info`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import shutil
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from loraplex.adapters.errors import (
    AdapterIncompatible,
    AdapterInvalid,
    AdapterNotFound,
    Conflict,
    LoraplexError,
    NotReady,
    StoreUnavailable,
)
from loraplex.adapters.fingerprint import inspect_base
from loraplex.adapters.records import AdapterVersion, BaseModelRecord, RegistrySnapshot
from loraplex.adapters.refs import DEFAULT_ALIAS, LATEST
from loraplex.adapters.registry import Registry
from loraplex.adapters.validate import validate_adapter_dir
from loraplex.server.disk_cache import CacheEntry, DiskCache, dir_bytes
from loraplex.server.interface import Engine, LoraRef
from loraplex.server.metrics import Metrics
from loraplex.server.settings import ServerSettings

log = logging.getLogger("loraplex.adapters")
# How long a request naming an unknown adapter waits for the registry before a 503 (a database
# that hangs instead of refusing must not hang requests).
LOOKUP_TIMEOUT_S = 5.0
# auto_pin: an adapter asked for once in the window is not popular, whatever its rank.
AUTO_PIN_MIN_REQUESTS = 2
# auto_pin: a top adapter takes an automatic pin's place only when asked for this many times as
# often (or when that pin fell out of the top 2 x auto_pin), so two adapters of about the same
# popularity near the cut are not pinned and released in turn.
AUTO_PIN_SWAP_FACTOR = 2


@dataclass
class _Loaded:
    ref: LoraRef
    version: AdapterVersion
    entry: str  # its directory in the disk cache
    pinned: bool = False
    auto: bool = False  # pinned by auto_pin (traffic decides when it goes), not by an operator


class AdapterManager:
    def __init__(self, settings: ServerSettings, registry: Registry, engine: Engine, metrics: Metrics):
        self.settings = settings
        self.registry = registry
        self.engine = engine
        self.metrics = metrics
        self.base: BaseModelRecord = inspect_base(settings.base, settings.model)
        self.snapshot = RegistrySnapshot(revision=-1, versions=[], aliases=[])
        self.loaded: dict[int, _Loaded] = {}  # by lora int id: handed to the engine
        self._loading: dict[int, asyncio.Future[LoraRef]] = {}
        # Requests holding each version (by lora int id), from `acquire` to `release`.
        self._uses: dict[int, int] = {}
        self.cache = DiskCache(settings.cache_dir, settings.adapter_cache_bytes,
                               self._evictable, self._evicted)
        # What the engine's host LRU probably holds (ids, least recently used first): a
        # request for anything else announces its adapter to the engine (`_prefetch`).
        self._host: OrderedDict[int, None] = OrderedDict()
        self._host_room = settings.max_cpu_loras  # minus pinned adapters (_pins_changed)
        # auto_pin: the last auto_pin_window adapter requests, counted by lora int id.
        self._traffic: deque[int] = deque(maxlen=settings.auto_pin_window)
        self._counts: Counter[int] = Counter()
        self._until_rebalance = self._rebalance_every
        self._rebalancing: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._names: tuple[RegistrySnapshot, dict[int, list[str]], dict[str, int]] | None = None
        self._refresh_lock = asyncio.Lock()
        self._poller: asyncio.Task | None = None
        self.registry_ok = False

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
        await self.cache.start()
        self.metrics.set_lora_info([], [], self.settings.max_loras)
        self._poller = asyncio.create_task(self._poll())
        for ref in self.settings.preload:
            version = await self.resolve(ref, None)
            if version is not None:
                await self.pin(version)

    async def stop(self) -> None:
        for task in (self._poller, self._rebalancing):
            if task is not None:
                task.cancel()

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
                    await asyncio.wait_for(self.refresh(), LOOKUP_TIMEOUT_S)
                except asyncio.TimeoutError:
                    self.registry_ok = False
                if not self.registry_ok:
                    raise StoreUnavailable(
                        f"{model!r} is not in this server's registry view (revision "
                        f"{self.snapshot.revision}) and the registry database cannot be reached "
                        "to look it up; retry shortly") from not_found
                # Look again whether or not this refresh moved the snapshot: a concurrent
                # request's refresh (or the poller's) may have brought it in meanwhile.
                return self.snapshot.resolve(model, key=user)
        except LoraplexError as exc:
            exc.param = "model"  # the request field that named it
            raise

    # -- loading --------------------------------------------------------------------------
    async def acquire(self, v: AdapterVersion, traffic: bool = True) -> LoraRef:
        """`ensure_loaded`, holding the version for one request until `release(v)`: while held
        (waiting for its load included), its disk copy is not evicted. `traffic`: a client's
        request, counted for auto_pin (an operator's pin is not)."""
        i = v.lora_int_id
        if traffic and self.settings.auto_pin:
            self._observe(i)
        self._uses[i] = self._uses.get(i, 0) + 1
        try:
            ref = await self.ensure_loaded(v)
        except BaseException:
            self.release(v)
            raise
        self._prefetch(ref)
        return ref

    def _prefetch(self, ref: LoraRef) -> None:
        """Announce `ref` to the engine before its request goes in, unless it is among the
        `max_cpu_loras` adapters most recently asked for (so, very probably, in the engine's
        host LRU: vLLM orders it by use too). The engine then reads it from disk on a thread
        while the request waits for its step, instead of inside that step, where every request
        in the batch would wait for the read. A wrong guess costs one message between steps
        (announced but resident) or the read vLLM would have done anyway (not announced)."""
        if self._in_host(ref.int_id):
            return
        prefetch = getattr(self.engine, "prefetch_lora", None)
        if self.settings.lora_prefetch and prefetch is not None:
            task = asyncio.create_task(prefetch(ref))
            self._tasks.add(task)  # a reference, or the loop may drop the task
            task.add_done_callback(self._tasks.discard)

    def release(self, v: AdapterVersion) -> None:
        i = v.lora_int_id
        n = self._uses.get(i, 0) - 1
        if n > 0:
            self._uses[i] = n
            return
        self._uses.pop(i, None)
        # Over the cap because everything was held (concurrent loads): back under it now that
        # this one is free, not at the next load.
        self.cache.trim_soon()

    def _in_host(self, int_id: int) -> bool:
        """Whether `int_id` was among the `max_cpu_loras` most recently used (pinned adapters
        always are, and leave the others fewer places); now it is."""
        hit = self.loaded.get(int_id)
        if hit is not None and hit.pinned:
            return True
        host = self._host
        was = int_id in host
        host[int_id] = None
        host.move_to_end(int_id)
        while len(host) > self._host_room:
            host.popitem(last=False)
        return was

    def _pins_changed(self) -> None:
        pinned = [i for i, h in self.loaded.items() if h.pinned]
        auto = sum(self.loaded[i].auto for i in pinned)
        self.metrics.pinned.labels("admin").set(len(pinned) - auto)
        self.metrics.pinned.labels("auto").set(auto)
        self._host_room = max(self.settings.max_cpu_loras - len(pinned), 1)
        for i in pinned:
            self._host.pop(i, None)

    async def ensure_loaded(self, v: AdapterVersion) -> LoraRef:
        hit = self.loaded.get(v.lora_int_id)
        if hit is not None:
            self.cache.touch(hit.entry)  # LRU
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
            path = await self._cached_copy(v)
            ref = LoraRef(name=v.name, version=v.version, int_id=v.lora_int_id, path=str(path))
            # For an id vLLM still holds (its copy was evicted from disk, not from the
            # engine), add_lora only touches it in vLLM's LRU: the same path, nothing re-read.
            await self.engine.add_lora(ref)
            self._in_host(v.lora_int_id)  # add_lora put it in the host LRU: no prefetch
            self.loaded[v.lora_int_id] = _Loaded(ref=ref, version=v, entry=path.name)
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

    # -- the disk cache -----------------------------------------------------------------------
    async def _cached_copy(self, v: AdapterVersion) -> Path:
        """The version's directory in the disk cache: a hit, or a fetch after making room for
        it (LRU eviction down to `adapter_cache_bytes`). A full disk evicts further and tries
        once more, then is a 503. Runs while `v` is in `_loading`, which protects its entry."""
        name = self._cache_path(v).name
        entry = self.cache.claim(name, v.lora_int_id)  # before any await: now protected
        reserved = 0 if entry is not None else v.total_size
        try:
            if reserved:
                await self.cache.make_room(reserved)  # reserves them (at once) for this fetch
            try:
                path, nbytes = await asyncio.to_thread(self._local_copy, v, entry is None)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                freed = await self.cache.make_room(need_free=v.total_size + (1 << 16))
                log.warning("adapter cache %s is full loading %s: evicted %d bytes, retrying",
                            self.settings.cache_dir, v.ref, freed)
                try:
                    path, nbytes = await asyncio.to_thread(self._local_copy, v, True)
                except OSError as exc2:
                    if exc2.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    raise NotReady(f"adapter {v.ref} cannot be loaded: this server's adapter "
                                   f"cache disk ({self.settings.cache_dir}) is full; retry "
                                   "shortly") from exc2
        finally:
            self.cache.unreserve(reserved)
        self.cache.put(name, nbytes, v.lora_int_id)
        if self.cache.over_cap:
            await self.cache.make_room()  # it came out larger than its record said
        return path

    def _local_copy(self, v: AdapterVersion, measure: bool) -> tuple[Path, int | None]:
        """(In a thread.) Disk cache hit, or fetch (sha256-verified) into a temp dir,
        validate, rename; with its size in bytes when fetched (or when `measure`).

        Nothing but a whole, verified copy ever appears under its cache name; a failed fetch
        leaves nothing."""
        d = self._cache_path(v)
        if d.exists():
            d.touch()  # LRU order for the index a restart builds
            return d, dir_bytes(d) if measure else None
        self._fetch_into_cache(v, d)
        return d, dir_bytes(d)

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

    def _evictable(self, e: CacheEntry) -> bool:
        """No request holds the entry's version, it is not loading and not pinned."""
        i = e.int_id
        if i is None:  # never used by this process: nothing can be reading it
            return True
        if self._uses.get(i) or i in self._loading:
            return False
        hit = self.loaded.get(i)
        return hit is None or not hit.pinned

    def _evicted(self, name: str, e: CacheEntry) -> None:
        """The cache let `name` go: its version's next request loads (fetches) it again."""
        hit = self.loaded.get(e.int_id) if e.int_id is not None else None
        if hit is not None and hit.entry == name:
            del self.loaded[e.int_id]

    # -- admin verbs ----------------------------------------------------------------------
    async def pin(self, v: AdapterVersion, auto: bool = False) -> LoraRef:
        """Keep `v` in vLLM's host LRU (not a batch slot: see VllmEngine.pin_lora).

        At most max_cpu_loras - max_loras adapters are pinned: the host LRU must still take a
        full batch of unpinned adapters, or the step that schedules one fails in the engine.
        An operator's pin (not `auto`) that finds no room releases the least requested
        automatic pin first, and pinning an automatically pinned adapter makes it theirs."""
        ref = await self.acquire(v, traffic=False)  # held: not evicted between load and pin
        try:
            hit = self.loaded[v.lora_int_id]
            if hit.pinned:
                if not auto and hit.auto:
                    hit.auto = False
                    self._pins_changed()
                return ref
            if not auto and self._room_left() <= 0:
                weakest = self._weakest_auto()
                if weakest is not None:
                    await self._release_pin(weakest)
            pinned = sorted(h.version.ref for h in self.loaded.values() if h.pinned)
            cpu, gpu, room = (self.settings.max_cpu_loras, self.settings.max_loras,
                              self.settings.pin_room)
            if len(pinned) >= room:
                raise Conflict(
                    f"cannot pin {v.ref}: {len(pinned)} adapter(s) are pinned "
                    f"({', '.join(pinned) or 'none'}) and at most max_cpu_loras - max_loras = "
                    f"{cpu} - {gpu} = {room} may be, so that a full batch of other adapters "
                    "still fits in host memory; unpin one (POST /admin/adapters/<ref>/unpin) "
                    "or raise LORAPLEX_MAX_CPU_LORAS", param="ref")
            hit.pinned, hit.auto = True, auto  # before the await: a concurrent pin counts it
            try:
                await self.engine.pin_lora(ref)
            except BaseException:
                hit.pinned = hit.auto = False
                raise
            finally:
                self._pins_changed()
        finally:
            self.release(v)
        return ref

    async def unpin(self, v: AdapterVersion) -> None:
        """Release `v`'s pin (an automatic one too: auto_pin may pin it again if its traffic
        keeps it among the most requested)."""
        hit = self.loaded.get(v.lora_int_id)
        if hit is not None and hit.pinned:
            await self._release_pin(hit)

    async def _release_pin(self, hit: _Loaded) -> None:
        # Marked before the await, so a pin arriving meanwhile pins it again (the engine runs
        # the two calls in order) instead of being told it is pinned already.
        was_auto = hit.auto
        hit.pinned = hit.auto = False
        try:
            await self.engine.unpin_lora(hit.ref)
        except BaseException:
            hit.pinned, hit.auto = True, was_auto
            raise
        finally:
            self._pins_changed()
        self._in_host(hit.ref.int_id)  # an LRU entry again (its place there: a guess)

    def _room_left(self) -> int:
        return self.settings.pin_room - sum(h.pinned for h in self.loaded.values())

    def _weakest_auto(self, exclude: Collection[int] = ()) -> _Loaded | None:
        """The automatic pin with the fewest requests in the window (not among `exclude`)."""
        autos = [(self._counts.get(i, 0), i) for i, h in self.loaded.items()
                 if h.auto and i not in exclude]
        return self.loaded[min(autos)[1]] if autos else None

    # -- automatic pins (auto_pin) -------------------------------------------------------------
    @property
    def _rebalance_every(self) -> int:
        return max(self.settings.auto_pin_window // 20, 5)

    def _observe(self, int_id: int) -> None:
        """Count one request for `int_id` in the window; every so often, re-rank (in a task:
        the request does not wait for it)."""
        window, counts = self._traffic, self._counts
        if len(window) == window.maxlen:  # the oldest request leaves the window
            old = window[0]
            counts[old] -= 1
            if counts[old] <= 0:
                del counts[old]
        window.append(int_id)
        counts[int_id] += 1
        self._until_rebalance -= 1
        if self._until_rebalance <= 0 and self._rebalancing is None:
            self._until_rebalance = self._rebalance_every
            self._rebalancing = asyncio.create_task(self._rebalance())

    async def _rebalance(self) -> None:
        """Pin the `auto_pin` adapters most requested in the window (each asked for at least
        AUTO_PIN_MIN_REQUESTS times). Release automatic pins that fell out of the top
        2 × auto_pin, and one outside the top whose place a top adapter asked for
        AUTO_PIN_SWAP_FACTOR times as often needs."""
        k, counts = self.settings.auto_pin, self._counts
        try:
            ranked = [i for i, n in counts.most_common() if n >= AUTO_PIN_MIN_REQUESTS]
            top, keep = ranked[:k], set(ranked[:2 * k])
            for hit in [h for i, h in self.loaded.items() if h.auto and i not in keep]:
                await self._release_pin(hit)
                self.metrics.auto_pin_changes.labels("unpin").inc()
            for i in top:
                hit = self.loaded.get(i)
                if hit is None or hit.pinned:  # not loaded (or evicted from disk): next time
                    continue
                if sum(h.auto for h in self.loaded.values()) >= k or self._room_left() <= 0:
                    weakest = self._weakest_auto(exclude=top)
                    if weakest is None or (counts[i] < AUTO_PIN_SWAP_FACTOR
                                           * counts.get(weakest.ref.int_id, 0)):
                        break  # ranked by count: no later candidate would take it either
                    await self._release_pin(weakest)
                    self.metrics.auto_pin_changes.labels("unpin").inc()
                await self.pin(hit.version, auto=True)
                self.metrics.auto_pin_changes.labels("pin").inc()
        except Exception as exc:  # noqa: BLE001 - an optimisation: never a request's error
            log.warning("auto_pin: re-ranking the adapters failed: %s", exc)
        finally:
            self._rebalancing = None

    async def unload(self, v: AdapterVersion) -> bool:
        hit = self.loaded.pop(v.lora_int_id, None)
        if hit is None:
            return False
        self._host.pop(v.lora_int_id, None)  # gone from vLLM's host LRU too: prefetch it next time
        if hit.pinned:
            self._pins_changed()
        await self.engine.remove_lora(hit.ref)
        return True

    async def update_residency(self) -> None:
        """Refresh the `loraplex_adapter_resident` gauge and the LoRA-affinity series
        (`lora_requests_info`); /metrics calls it before rendering.

        Only there: the gauge is read nowhere else, and the engine query is a worker RPC that,
        run after a load, would queue ahead of the request that waited for it (P3 measured it).

        accelerator / host come from the engine itself: vLLM moves adapters between its
        `max_loras` batch slots and its `max_cpu_loras` host LRU on its own, so the server's
        `loaded` map says what was handed over, not where it is now. disk is the local cache
        (its in-memory index: no directory walk here).
        """
        try:
            engine_view = await asyncio.wait_for(self.engine.lora_residency(), timeout=2.0)
        except Exception:  # a slow or dead engine must not break /metrics
            engine_view = None
        if engine_view is None:  # the engine cannot tell: report what we handed it
            engine_view = {i: {"host"} for i in self.loaded}
        tiers: dict[str, list[tuple[str, int]]] = {"accelerator": [], "host": [], "pinned": [],
                                                   "disk": []}
        for v in self.snapshot.versions:
            for tier in sorted(engine_view.get(v.lora_int_id, ())):
                tiers[tier].append((v.name, v.version))
            if self._cache_path(v).name in self.cache:
                tiers["disk"].append((v.name, v.version))
        self.metrics.set_residency(tiers)
        loads = getattr(self.engine, "lora_loads", None)
        if loads:
            self.metrics.set_engine_reads(loads)
        hot = {i for i, where in engine_view.items() if "accelerator" in where}
        self.metrics.set_lora_info(*self.lora_requests_info(hot, self.metrics.engine_lora_requests()))

    def lora_requests_info(self, hot: Collection[int] = (),
                           engine: tuple[set[str], set[str]] | None = None
                           ) -> tuple[list[str], list[str], int]:
        """(running, waiting, max_lora) for the endpoint picker's LoRA affinity, in vLLM's
        `vllm:lora_requests_info` convention, but in the names clients send: every reference
        that resolves to the version (`name@N`, `name:alias` for each alias that can pick it,
        `name` and `name:latest` where they mean it), so a request that names an alias is
        routed by affinity too (vLLM's own series knows only `name@N`).

        - running: versions with requests handed to the engine (`acquire`d, loaded) that
          vLLM's scheduler does not report as only waiting, and versions in one of the
          engine's `max_loras` batch slots (`hot`, from the worker query): a request routed
          there needs no load at all, also between bursts, when nothing of it is in flight.
        - waiting: versions whose requests wait for their adapter's load (fetch, validation,
          `add_lora`), and those whose engine requests vLLM's scheduler reports waiting for a
          slot and none running (`engine`: the running / waiting `name@N` sets of vLLM's
          latest sample, read only for versions with requests in flight here, so a stale
          sample says nothing). A version is in one list or the other, never both.
        - max_lora: the engine's `max_loras`, plus the extra names listed (aliases, idle hot
          versions). The picker's capacity test is `len(running) + len(waiting) < max_lora`
          over names; with this, it holds exactly when fewer adapter versions than
          `max_loras` have requests here, and several names of one adapter do not fill a
          replica.
        """
        names, by_key = self._client_names()
        e_run, e_wait = engine if engine is not None else (set(), set())
        e_run = {by_key[k] for k in e_run if k in by_key}
        e_wait = {by_key[k] for k in e_wait if k in by_key}
        held = [i for i, n in self._uses.items() if n > 0]
        busy = {i for i in held if i in self.loaded and i not in self._loading}
        # Waiting for a slot: vLLM lists it waiting and not running. vLLM 0.32 also lists as
        # waiting, for its whole life, every request it runs (measured: one stream of one
        # adapter shows in both lists), so "in both" means running.
        slot_wait = busy & (e_wait - e_run)
        waiting = {i for i in held if i in self._loading} | slot_wait
        busy -= slot_wait
        running = busy | set(hot)
        run_names = sorted({n for i in running for n in names.get(i, ())})
        wait_names = sorted({n for i in waiting for n in names.get(i, ())})
        counted = len([i for i in busy if i in names]) + len([i for i in waiting if i in names])
        extra = len(run_names) + len(wait_names) - counted
        return run_names, wait_names, max(self.settings.max_loras + extra, 0)

    def _client_names(self) -> tuple[dict[int, list[str]], dict[str, int]]:
        """({lora int id: the references that resolve to it}, {`name@N`: int id}) for the
        current snapshot (computed once per snapshot)."""
        snap = self.snapshot
        if self._names is not None and self._names[0] is snap:
            return self._names[1], self._names[2]
        by_ref = {(v.name, v.version): v for v in snap.versions}
        names: dict[int, set[str]] = {}
        latest: dict[str, AdapterVersion] = {}
        for v in snap.versions:
            if v.state == "active":
                names.setdefault(v.lora_int_id, set()).add(f"{v.name}@{v.version}")
                cur = latest.get(v.name)
                if cur is None or v.version > cur.version:
                    latest[v.name] = v
        default = {a.name for a in snap.aliases if a.alias == DEFAULT_ALIAS}
        for name, v in latest.items():
            got = names[v.lora_int_id]
            got.add(f"{name}:{LATEST}")
            if name not in default:
                got.add(name)
        for a in snap.aliases:
            for version, _ in a.weights:
                v = by_ref.get((a.name, version))
                if v is not None:
                    got = names.setdefault(v.lora_int_id, set())
                    got.add(f"{a.name}:{a.alias}")
                    if a.alias == DEFAULT_ALIAS:
                        got.add(a.name)
        out = {i: sorted(n) for i, n in names.items()}
        by_key = {f"{v.name}@{v.version}": v.lora_int_id for v in snap.versions}
        self._names = (snap, out, by_key)
        return out, by_key
