"""Prometheus series of loraplex, labelled by adapter and version.

vLLM's own `vllm:*` series (autoscalers and the Gateway API Inference Extension key on them,
e.g. `vllm:num_requests_waiting`) stay in prometheus_client's default registry exactly as vLLM
writes them; ours live in a registry of their own (so several apps in one test process do not
collide) and `/metrics` serves both.
The base model is labelled `adapter="<served name>", version="base"`.

One exception: `vllm:lora_requests_info`, the series the Inference Extension's endpoint picker
reads for LoRA affinity. vLLM's knows only the engine's `name@N` names, so a request naming an
alias (`name:prod`) or a bare name would never match it. loraplex writes it instead, in the
names clients send (AdapterManager.lora_requests_info), once as `loraplex_lora_requests_info`
and once under vLLM's exact name (the picker's default for vLLM servers), and leaves vLLM's own
family out of /metrics: two families of one name would make the scrape unparseable. Same
labels as vLLM's (`running_lora_adapters`, `waiting_lora_adapters`: comma-separated names;
`max_lora`), one series, its value the time of the scrape (the picker takes the series with
the largest value, so the latest).
"""

from __future__ import annotations

import time

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

VLLM_LORA_INFO = "vllm:lora_requests_info"
LORA_INFO_LABELS = ("max_lora", "running_lora_adapters", "waiting_lora_adapters")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
LABELS = ("adapter", "version")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "loraplex_requests", "Requests by adapter, endpoint and HTTP status.",
            [*LABELS, "endpoint", "status"], registry=r)
        self.prompt_tokens = Counter(
            "loraplex_prompt_tokens", "Prompt tokens processed.", LABELS, registry=r)
        self.completion_tokens = Counter(
            "loraplex_completion_tokens", "Completion tokens generated.", LABELS, registry=r)
        self.ttft = Histogram(
            "loraplex_time_to_first_token_seconds", "Time from request to first token.",
            LABELS, buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram(
            "loraplex_request_duration_seconds", "End-to-end request latency.",
            LABELS, buckets=LATENCY_BUCKETS, registry=r)
        self.load_seconds = Histogram(
            "loraplex_adapter_load_seconds", "Time to fetch, validate and load an adapter.",
            LABELS, buckets=LATENCY_BUCKETS, registry=r)
        self.loads = Counter(
            "loraplex_adapter_loads", "Adapter loads by result (ok, error).",
            [*LABELS, "result"], registry=r)
        self.cache_hits = Counter(
            "loraplex_adapter_cache_hits", "Requests whose adapter was already loaded.",
            LABELS, registry=r)
        self.resident = Gauge(
            "loraplex_adapter_resident", "1 for each tier holding a copy of an adapter version "
            "(accelerator: in one of the engine's max_loras batch slots; host: in the engine's "
            "host-memory adapter cache; pinned: pinned there; disk: in the server's local disk "
            "cache).",
            [*LABELS, "tier"], registry=r)
        self.pinned = Gauge(
            "loraplex_adapters_pinned", "Adapters pinned in the engine's host cache, by how: "
            "admin (the admin API or preload) or auto (auto_pin, following traffic).",
            ["how"], registry=r)
        self.auto_pin_changes = Counter(
            "loraplex_auto_pin_changes", "Automatic pins made and released (auto_pin).",
            ["action"], registry=r)
        self.engine_reads = Counter(
            "loraplex_engine_adapter_reads", "Adapter reads from disk into the engine's host "
            "cache (vLLM's max_cpu_loras LRU), by how: prefetched (on a worker thread, started "
            "as the request arrived) or blocking (by the engine thread: inside the step that "
            "scheduled it, or on a first load).",
            ["how"], registry=r)
        self.engine_read_seconds = Counter(
            "loraplex_engine_adapter_read_seconds", "Time the engine spent reading adapters "
            "from disk (either way).", registry=r)
        self.engine_step_wait_seconds = Counter(
            "loraplex_engine_adapter_step_wait_seconds", "Time engine steps waited for "
            "adapter reads (all of a blocking read; what was left of a prefetched one).",
            registry=r)
        self._engine_seen: dict[str, float] = {}
        self.in_flight = Gauge(
            "loraplex_requests_in_flight", "Requests being served now.", registry=r)
        self.registry_revision = Gauge(
            "loraplex_registry_revision", "Registry revision of the served view.", registry=r)
        self.lora_info = _LoraInfo()
        r.register(self.lora_info)

    def set_lora_info(self, running: list[str], waiting: list[str], max_lora: int) -> None:
        self.lora_info.state = (str(max_lora), ",".join(running), ",".join(waiting))

    @staticmethod
    def engine_lora_requests() -> tuple[set[str], set[str]] | None:
        """(running, waiting) `name@N` sets of the engine's own latest `vllm:lora_requests_info`
        sample (the one with the largest timestamp, as the picker reads it); None if vLLM
        wrote none in this process.

        vLLM adds a series to that gauge for every distinct set of labels it ever sets and
        drops none: with many adapters, a new one almost every step, so the gauge (collected
        at each scrape, even though /metrics leaves it out) would grow for the process's
        life. Only the latest says anything, so the rest are dropped here."""
        samples = [s for fam in REGISTRY.restricted_registry([VLLM_LORA_INFO]).collect()
                   for s in fam.samples if s.name == VLLM_LORA_INFO]
        if not samples:
            return None
        latest = max(samples, key=lambda s: s.value)
        if len(samples) > 1:
            gauge = getattr(REGISTRY, "_names_to_collectors", {}).get(VLLM_LORA_INFO)
            if isinstance(gauge, Gauge):  # vLLM's (its Ray variant is something else)
                try:
                    gauge.clear()
                    gauge.labels(**latest.labels).set(latest.value)
                except Exception:  # noqa: BLE001 - a vLLM that changed the labels: keep it
                    pass

        def names(label: str) -> set[str]:
            return {n.strip() for n in latest.labels.get(label, "").split(",") if n.strip()}

        return names("running_lora_adapters"), names("waiting_lora_adapters")

    def set_engine_reads(self, loads: dict[str, float]) -> None:
        """The engine's cumulative read counts (`VllmEngine.lora_loads`) into the counters."""
        def add(counter, key):
            delta = loads.get(key, 0) - self._engine_seen.get(key, 0)
            if delta > 0:  # a restarted engine starts from 0 again: wait until it passes
                counter.inc(delta)
                self._engine_seen[key] = loads[key]
        add(self.engine_reads.labels("prefetched"), "prefetched")
        add(self.engine_reads.labels("blocking"), "blocking")
        add(self.engine_read_seconds, "seconds")
        add(self.engine_step_wait_seconds, "step_wait_seconds")

    def set_residency(self, tiers: dict[str, list[tuple[str, int]]]) -> None:
        self.resident.clear()
        for tier, items in tiers.items():
            for name, version in items:
                self.resident.labels(name, str(version), tier).set(1)

    def render(self) -> bytes:
        return generate_latest(_Without(REGISTRY, VLLM_LORA_INFO)) + generate_latest(self.registry)


class _LoraInfo:
    """The LoRA-affinity series, under loraplex's name and vLLM's (see the module docstring).
    No sample until the server has set it."""

    HELP = ("LoRA adapters with requests running or resident in the engine's batch slots, and "
            "with requests waiting for a load or a slot, in every name a client may send "
            "(vLLM's vllm:lora_requests_info convention; value: the time of the scrape). "
            "max_lora: the engine's max_loras plus the extra names listed, so that names listed "
            "< max_lora holds exactly when adapter versions with requests < max_loras.")

    def __init__(self) -> None:
        self.state: tuple[str, str, str] | None = None

    def collect(self):
        now = time.time()
        for name in ("loraplex_lora_requests_info", VLLM_LORA_INFO):
            fam = GaugeMetricFamily(name, self.HELP, labels=LORA_INFO_LABELS)
            if self.state is not None:
                fam.add_metric(list(self.state), now)
            yield fam


class _Without:
    """A registry's families less one (for generate_latest, which only calls collect)."""

    def __init__(self, registry, name: str) -> None:
        self.registry, self.name = registry, name

    def collect(self):
        for fam in self.registry.collect():
            if fam.name != self.name:
                yield fam
