"""Prometheus metrics of one server (its own registry, so several servers can live in one process in tests).

The engine thread reports steps, first audio and finished streams; the HTTP layer counts responses by status.
`GET /metrics` renders them in Prometheus' text format.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10)
RTF_BUCKETS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    def __init__(self, backend: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.info = Gauge("voxlm_backend_info", "The engine's backend", ["backend"], registry=r)
        self.info.labels(backend).set(1)
        self.ttfa = Histogram("voxlm_time_to_first_audio_seconds",
                              "From a request's arrival to its first audio leaving the engine", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.rtf = Histogram("voxlm_real_time_factor", "Request wall time / audio duration", registry=r,
                             buckets=RTF_BUCKETS)
        self.batch = Histogram("voxlm_decode_batch_size", "Rows in each decode step", registry=r,
                               buckets=BATCH_BUCKETS)
        self.prefill_batch = Histogram("voxlm_prefill_batch_size", "Requests prefilled together",
                                       registry=r, buckets=BATCH_BUCKETS)
        self.queue_depth = Gauge("voxlm_queue_depth", "Requests waiting for a KV pool slot", registry=r)
        self.active = Gauge("voxlm_active_streams", "Requests holding a KV pool slot", registry=r)
        self.capacity = Gauge("voxlm_kv_pool_capacity", "KV pool slots", registry=r)
        self.kv_tokens = Gauge("voxlm_kv_cache_tokens", "Token positions held in the KV cache (with padding)",
                               registry=r)
        self.audio_seconds = Counter("voxlm_audio_seconds", "Audio produced", registry=r)
        self.truncated = Counter("voxlm_truncated_streams", "Streams cut off by the length guard", registry=r)
        self.responses = Counter("voxlm_responses", "HTTP responses by route and status", ["route", "status"],
                                 registry=r)
        self.disconnects = Counter("voxlm_client_disconnects", "Streams cancelled by their client",
                                   registry=r)

    # --- called by the engine thread ---
    def engine_state(self, queue_depth: int, active_streams: int, pool_capacity: int, kv_tokens: int) -> None:
        self.queue_depth.set(queue_depth)
        self.active.set(active_streams)
        self.capacity.set(pool_capacity)
        self.kv_tokens.set(kv_tokens)

    def decode_step(self, batch: int) -> None:
        self.batch.observe(batch)

    def prefill(self, batch: int) -> None:
        self.prefill_batch.observe(batch)

    def first_audio(self, seconds: float) -> None:
        self.ttfa.observe(seconds)

    def finished(self, rtf: float | None, audio_seconds: float, truncated: bool) -> None:
        if rtf is not None:
            self.rtf.observe(rtf)
        self.audio_seconds.inc(audio_seconds)
        if truncated:
            self.truncated.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
