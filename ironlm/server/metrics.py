"""Prometheus metrics for one app: its own registry, so two apps in a process never share counters."""
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0, 120.0)


class _StateCollector:
    """Gauges read at scrape time: the engine's last stats and the server's own queue."""

    def __init__(self, engine_stats: Callable[[], dict], server_state: Callable[[], dict]):
        self.engine_stats = engine_stats
        self.server_state = server_state

    def collect(self):
        stats = self.engine_stats()
        server = self.server_state()
        gauges = [
            ("ironlm_requests_running", "Sequences the engine is decoding", stats.get("num_running", 0)),
            ("ironlm_requests_waiting", "Sequences queued in the engine", stats.get("num_waiting", 0)),
            ("ironlm_queue_depth", "HTTP requests waiting for a slot plus sequences waiting in the engine",
             server["num_queued"] + stats.get("num_waiting", 0)),
            ("ironlm_http_requests_in_flight", "HTTP generation requests holding a slot", server["num_active"]),
            ("ironlm_kv_cache_usage_ratio", "Fraction of KV cache blocks in use", stats.get("kv_usage", 0.0)),
            ("ironlm_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache, as a fraction",
             stats.get("prefix_cache_hit_rate", 0.0)),
            ("ironlm_engine_steps", "Engine steps since start", stats.get("num_steps", 0)),
            ("ironlm_draft_tokens", "Prompt-lookup draft tokens computed since start",
             stats.get("num_draft_tokens", 0)),
            ("ironlm_draft_tokens_kept", "Of those, the tokens the model agreed with",
             stats.get("num_kept_draft_tokens", 0)),
            ("ironlm_engine_alive", "1 while the engine thread runs", 1.0 if server["alive"] else 0.0),
        ]
        for name, documentation, value in gauges:
            yield GaugeMetricFamily(name, documentation, value=float(value or 0))


class ServerMetrics:
    """Counters and histograms the request handlers update, plus gauges read from the engine when scraped."""

    def __init__(self, engine_stats: Callable[[], dict], server_state: Callable[[], dict]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ironlm_requests", "Finished HTTP requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("ironlm_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("ironlm_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("ironlm_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("ironlm_inter_token_latency_seconds", "Time between generated tokens",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("ironlm_request_latency_seconds", "Arrival to last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        r.register(_StateCollector(engine_stats, server_state))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
