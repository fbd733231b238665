"""What `GET /metrics` reports, in Prometheus' text format (version 0.0.4), written by hand: a few
counters, gauges and histograms need no client library."""

from __future__ import annotations

from collections import defaultdict

from .store import AdapterStore

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [
            f'{name}_bucket{{{labels}{sep}le="{_num(edge)}"}} {count}' for edge, count in zip(self.buckets, self.counts)
        ]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        braces = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{braces} {self.sum:.6f}", f"{name}_count{braces} {self.total}"]


class Metrics:
    """Counters of the server, updated on the event loop (requests) and after each batch."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)  # (endpoint, status) -> count
        self.latency: dict[str, Histogram] = {}
        self.batch_rows = Histogram(_BATCH_BUCKETS)
        self.queue_depth = 0

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[(endpoint, status)] += 1
        self.latency.setdefault(endpoint, Histogram(_LATENCY_BUCKETS)).observe(seconds)

    def batch(self, rows: int) -> None:
        self.batch_rows.observe(rows)

    def text(self, store: AdapterStore) -> str:
        lines = [
            "# HELP lorakit_requests_total HTTP requests by endpoint and status.",
            "# TYPE lorakit_requests_total counter",
        ]
        lines += [
            f'lorakit_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())
        ]
        errors = sum(n for (_, s), n in self.requests.items() if s >= 400)
        lines += [
            "# HELP lorakit_request_errors_total HTTP requests answered with a 4xx or 5xx status.",
            "# TYPE lorakit_request_errors_total counter",
            f"lorakit_request_errors_total {errors}",
            "# HELP lorakit_request_duration_seconds Time from request to the end of the response.",
            "# TYPE lorakit_request_duration_seconds histogram",
        ]
        for endpoint, hist in sorted(self.latency.items()):
            lines += hist.lines("lorakit_request_duration_seconds", f'endpoint="{endpoint}"')
        lines += [
            "# HELP lorakit_queue_depth Rows waiting for a batch.",
            "# TYPE lorakit_queue_depth gauge",
            f"lorakit_queue_depth {self.queue_depth}",
            "# HELP lorakit_batch_rows Rows per batch run on the model.",
            "# TYPE lorakit_batch_rows histogram",
        ]
        lines += self.batch_rows.lines("lorakit_batch_rows")
        gauges = [
            ("adapters_registered", "Adapters the server knows.", len(store.entries)),
            ("adapters_loaded", "Adapters loaded on the model.", len(store.loaded)),
            ("adapter_loaded_bytes", "Bytes of the loaded adapters' tensors.", store.loaded_bytes),
        ]
        for name, text, value in gauges:
            lines += [f"# HELP lorakit_{name} {text}", f"# TYPE lorakit_{name} gauge", f"lorakit_{name} {value}"]
        counters = [
            ("adapter_loads_total", "Adapter loads.", store.loads),
            ("adapter_evictions_total", "Adapters unloaded to stay within the byte budget.", store.evictions),
            ("adapter_load_failures_total", "Adapter loads that failed.", store.failures),
        ]
        for name, text, value in counters:
            lines += [f"# HELP lorakit_{name} {text}", f"# TYPE lorakit_{name} counter", f"lorakit_{name} {value}"]
        return "\n".join(lines) + "\n"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)
