"""Prometheus metrics of one server, in their own registry (so two apps in one process never collide)."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("fusionserve_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter("fusionserve_request_finish", "Engine requests finished, by finish reason",
                                ["reason"], registry=r)
        self.time_to_first_token = Histogram("fusionserve_time_to_first_token_seconds",
                                             "Arrival (before media decoding) to the first generated token",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("fusionserve_inter_token_latency_seconds",
                                             "Time between generated tokens of one request",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.preprocess_seconds = Histogram("fusionserve_preprocess_seconds",
                                            "Media decoding, patchifying and tokenization per request",
                                            buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge("fusionserve_requests_running", "Requests the engine is running", registry=r)
        self.waiting = Gauge("fusionserve_requests_waiting", "Requests waiting for the engine", registry=r)
        self.preprocessing = Gauge("fusionserve_requests_preprocessing", "Requests in media decoding", registry=r)
        self.reading = Gauge("fusionserve_requests_reading", "Admitted requests reading their body, fetching or "
                             "decoding media (bounded by max_num_reading)", registry=r)
        self.kv_blocks_used = Gauge("fusionserve_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_blocks_free = Gauge("fusionserve_kv_blocks_free", "KV cache blocks free (cached prefixes "
                                    "with no user count as free)", registry=r)
        self.prefix_cache_hit_rate = Gauge("fusionserve_prefix_cache_hit_rate",
                                           "Prompt tokens served from the prefix cache / prompt tokens", registry=r)
        self.preemptions = Gauge("fusionserve_preemptions", "Preemptions since start", registry=r)

    def render(self, stats, num_preprocessing: int, num_reading: int = 0) -> bytes:
        """Text exposition; ``stats`` is the engine's latest EngineStats (None while loading)."""
        self.preprocessing.set(num_preprocessing)
        self.reading.set(num_reading)
        if stats is not None:
            self.running.set(stats.num_running)
            self.waiting.set(stats.num_waiting)
            self.kv_blocks_used.set(stats.num_kv_blocks_used)
            self.kv_blocks_free.set(stats.num_kv_blocks - stats.num_kv_blocks_used)
            self.prefix_cache_hit_rate.set(stats.prefix_cache_hit_rate)
            self.preemptions.set(stats.num_preemptions)
        return generate_latest(self.registry)
