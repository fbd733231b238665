"""What `GET /metrics` reports, through `prometheus_client`, on a registry of the app's own (two
apps in one process, as in the tests, count apart)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .store import AdapterStore

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)  # seconds per token
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_STEP_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The server's counters, updated on the event loop (requests) and by the batch loop."""

    def __init__(self, store: AdapterStore | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._requests = Counter(
            "lorakit_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"], registry=r
        )
        self._errors = Counter("lorakit_request_errors", "HTTP requests answered with a 4xx or 5xx status.", registry=r)
        self._latency = Histogram(
            "lorakit_request_duration_seconds",
            "Time from request to the end of the response.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("lorakit_queue_depth", "Rows waiting to run (not yet in a batch).", registry=r)
        self.batch_rows = Histogram(
            "lorakit_batch_rows",
            "Rows per batch (generation: per group admitted at once).",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.running = Gauge("lorakit_running_rows", "Generation rows in the running batch.", registry=r)
        self.step_tokens = Histogram(
            "lorakit_step_tokens",
            "Tokens through the model per generation step (decoding rows plus prefill).",
            buckets=_STEP_TOKEN_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "lorakit_time_to_first_token_seconds",
            "From a row's arrival to its first token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "lorakit_time_per_output_token_seconds",
            "A row's time per token after its first.",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        if store is not None:
            r.register(_StoreCollector(store))

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self._requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self._errors.inc()
        self._latency.labels(endpoint).observe(seconds)

    @property
    def handled(self) -> int:
        """Requests answered so far (the sum of lorakit_requests over endpoints and statuses)."""
        return int(sum(s.value for m in self._requests.collect() for s in m.samples if s.name.endswith("_total")))

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """One sample, by its name in the exposition (e.g. "lorakit_batch_rows_count")."""
        return self.registry.get_sample_value(name, labels or {})

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _StoreCollector(Collector):
    """The adapter store's numbers, read when /metrics is asked."""

    def __init__(self, store: AdapterStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        s = self.store
        yield GaugeMetricFamily("lorakit_adapters_registered", "Adapters the server knows.", value=len(s.entries))
        yield GaugeMetricFamily("lorakit_adapters_loaded", "Adapters loaded on the model.", value=len(s.loaded))
        yield GaugeMetricFamily(
            "lorakit_adapter_loaded_bytes", "Bytes of the loaded adapters' tensors.", value=s.loaded_bytes
        )
        yield CounterMetricFamily("lorakit_adapter_loads", "Adapter loads.", value=s.loads)
        yield CounterMetricFamily(
            "lorakit_adapter_evictions", "Adapters unloaded to stay within the byte budget.", value=s.evictions
        )
        yield CounterMetricFamily("lorakit_adapter_load_failures", "Adapter loads that failed.", value=s.failures)
