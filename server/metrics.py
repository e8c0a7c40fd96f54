"""Prometheus series of loraplex, labelled by adapter and version.

vLLM's own `vllm:*` series (autoscalers and the Gateway API Inference Extension key on them,
e.g. `vllm:num_requests_waiting`, `vllm:lora_requests_info`) stay in prometheus_client's
default registry exactly as vLLM writes them; ours live in a registry of their own (so several
apps in one test process do not collide) and `/metrics` serves both.
The base model is labelled `adapter="<served name>", version="base"`.
"""

from __future__ import annotations

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

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
            "host-memory adapter cache; disk: in the server's local disk cache).",
            [*LABELS, "tier"], registry=r)
        self.in_flight = Gauge(
            "loraplex_requests_in_flight", "Requests being served now.", registry=r)
        self.registry_revision = Gauge(
            "loraplex_registry_revision", "Registry revision of the served view.", registry=r)

    def set_residency(self, tiers: dict[str, list[tuple[str, int]]]) -> None:
        self.resident.clear()
        for tier, items in tiers.items():
            for name, version in items:
                self.resident.labels(name, str(version), tier).set(1)

    def render(self) -> bytes:
        return generate_latest(REGISTRY) + generate_latest(self.registry)
