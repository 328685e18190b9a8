"""Prometheus metrics of the service (DESIGN.md section 4), shared by every TorchServe worker.

Why our own metrics: TorchServe's metrics have no histograms. We use prometheus-client in *multiprocess
mode*: the
`deepclust serve` parent creates an empty directory and passes it as `PROMETHEUS_MULTIPROC_DIR` to
TorchServe, whose
workers inherit it; each worker writes its samples to memory-mapped files there, and the parent serves the
aggregate
on the metrics port (default `127.0.0.1:8082/metrics`). Without that variable (a bare engine in a notebook,
unit
tests) the same metrics live in an ordinary per-process registry.

Conventions: base units (seconds), `_total` counters, low cardinality (`outcome` is `ok` or an error code,
`cluster`
is bounded by K).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class ServiceMetrics:
    """The service metrics, registered once per process (`ServiceMetrics.get()`)."""

    _instance: ServiceMetrics | None = None
    _lock = threading.Lock()

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kwargs = {"registry": registry} if registry is not None else {}
        self.requests = Counter(
            "deepclust_requests",
            "Prediction requests by outcome (ok, partial, error, bad_request).",
            ["outcome"],
            **kwargs,
        )
        self.images = Counter(
            "deepclust_images", "Images by outcome (ok or the per-image error code).", ["outcome"], **kwargs
        )
        self.request_duration = Histogram(
            "deepclust_request_duration_seconds",
            "Time in the handler per request: decode, inference and response of its server-side batch.",
            buckets=LATENCY_BUCKETS,
            **kwargs,
        )
        self.inference_duration = Histogram(
            "deepclust_inference_duration_seconds",
            "onnxruntime time per server-side batch.",
            buckets=LATENCY_BUCKETS,
            **kwargs,
        )
        self.batch_size = Histogram(
            "deepclust_batch_size",
            "Images per server-side batch sent to the engine.",
            buckets=BATCH_BUCKETS,
            **kwargs,
        )
        self.cluster_assignments = Counter(
            "deepclust_cluster_assignments", "Images assigned to each cluster.", ["cluster"], **kwargs
        )
        self.confidence = Histogram(
            "deepclust_confidence",
            "Max cluster probability of each assigned image.",
            buckets=CONFIDENCE_BUCKETS,
            **kwargs,
        )
        gauge_kwargs = dict(kwargs)
        if os.environ.get(MULTIPROC_ENV):
            gauge_kwargs["multiprocess_mode"] = "max"
        self.model_info = Gauge(
            "deepclust_model_info",
            "The model being served (value 1).",
            ["model", "method", "k", "sha"],
            **gauge_kwargs,
        )

    @classmethod
    def get(cls) -> ServiceMetrics:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def set_model(self, model: str, method: str, k: int, sha: str) -> None:
        self.model_info.labels(model=model, method=method, k=str(k), sha=sha[:12]).set(1)


def prepare_multiprocess_dir(path: str | Path) -> Path:
    """Create (or empty) the directory the workers write their samples to: stale files would double-count."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)
    return path


def multiprocess_registry(path: str | Path) -> CollectorRegistry:
    """A registry that aggregates every worker's samples from `path` (for the parent's /metrics endpoint)."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(path))
    return registry


def start_metrics_server(host: str, port: int, multiproc_dir: str | Path):
    """Serve the aggregated metrics on `host:port` in a daemon thread; returns (server, thread)."""
    from prometheus_client import start_http_server

    return start_http_server(port, addr=host, registry=multiprocess_registry(multiproc_dir))
