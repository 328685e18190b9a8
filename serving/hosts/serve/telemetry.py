"""Prometheus metrics of the service (docs/design.md §4), all served on one port by `deepclust serve` (both backends).

Why our own metrics: TorchServe's metrics have no histograms. We use prometheus-client in *multiprocess mode*: the
`deepclust serve` parent creates an empty directory and passes it as `PROMETHEUS_MULTIPROC_DIR` to TorchServe, whose
workers inherit it; each worker writes its samples (`ServiceMetrics`: images, inference time, batch size, clusters,
confidence, model info) to memory-mapped files there. The parent's HTTP front (`front.py`) measures what only it
sees (`FrontMetrics`: requests by outcome and their end-to-end latency) in an ordinary registry, and the parent serves
both in one registry on the metrics port (default `127.0.0.1:8082/metrics`). Without the multiprocess variable (a bare
engine in a notebook, unit tests) the workers' metrics live in an ordinary per-process registry.

Conventions: base units (seconds), `_total` counters, low cardinality (`outcome` is `ok` or an error code,
`cluster` is bounded by K).
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


class FrontMetrics:
    """What only the HTTP front sees (`front.py`): every prediction request end to end, TorchServe's queueing
    and batching delay included, and requests TorchServe or the front refuse before the handler runs.

    Lives in the `deepclust serve` parent, in the same registry (and port) as the workers' aggregated metrics."""

    OUTCOMES = (
        "ok, partial, error (per-image errors in a 200 answer), bad_request, too_large, timeout, unauthorized, "
        "not_found, unavailable, backend_unavailable, server_error"
    )

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "deepclust_requests",
            f"Prediction requests by outcome ({self.OUTCOMES}).",
            ["outcome"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "deepclust_request_duration_seconds",
            "End-to-end time per prediction request at the HTTP front: request head received to answer sent.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def observe(self, seconds: float, outcome: str) -> None:
        self.request_duration.observe(seconds)
        self.requests.labels(outcome=outcome).inc()


class ServiceMetrics:
    """The TorchServe workers' metrics (one set per process, `ServiceMetrics.get()`); the per-request ones are
    in `FrontMetrics`."""

    _instance: ServiceMetrics | None = None
    _lock = threading.Lock()

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kwargs = {"registry": registry} if registry is not None else {}
        self.images = Counter(
            "deepclust_images", "Images by outcome (ok or the per-image error code).", ["outcome"], **kwargs
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
            ["model", "method", "k", "sha", "provider"],
            **gauge_kwargs,
        )

    @classmethod
    def get(cls) -> ServiceMetrics:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def observe_batch(self, answers: list[list[dict]], batch: int, seconds: float) -> None:
        """One server-side batch: its size and onnxruntime time (when any image reached the engine), then every
        answered item: its outcome and, when assigned, its cluster and confidence."""
        if batch:
            self.inference_duration.observe(seconds)
            self.batch_size.observe(batch)
        for answer in answers:
            for item in answer:
                if "error" in item:
                    self.images.labels(outcome=item["error"]["code"]).inc()
                else:
                    self.images.labels(outcome="ok").inc()
                    self.cluster_assignments.labels(cluster=str(item["cluster"])).inc()
                    self.confidence.observe(item["confidence"])

    def set_model(self, model: str, method: str, k: int, sha: str, provider: str = "cpu") -> None:
        """`provider` is the onnxruntime provider actually running (`cuda`, `cpu`, …): a pod that lost its GPU
        shows `cpu` here."""
        self.model_info.labels(model=model, method=method, k=str(k), sha=sha[:12], provider=provider).set(1)


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


def start_metrics_server(host: str, port: int, multiproc_dir: str | Path, registry: CollectorRegistry | None = None):
    """Serve the workers' aggregated metrics (plus `registry`'s own, e.g. the front's) on `host:port` in a daemon
    thread; returns (server, thread). Pass the registry `multiprocess_registry()` returned to add metrics to it."""
    from prometheus_client import start_http_server

    registry = registry if registry is not None else multiprocess_registry(multiproc_dir)
    return start_http_server(port, addr=host, registry=registry)
