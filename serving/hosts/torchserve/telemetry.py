"""Former home of the service's Prometheus metrics, now `serving.hosts.serve.telemetry` (shared by both `deepclust
serve` backends). Kept so that the TorchServe handler's import (`serving.hosts.torchserve.telemetry.ServiceMetrics`)
and older callers keep working."""

from serving.hosts.serve.telemetry import (  # noqa: F401 - re-exported
    BATCH_BUCKETS,
    CONFIDENCE_BUCKETS,
    LATENCY_BUCKETS,
    MULTIPROC_ENV,
    FrontMetrics,
    ServiceMetrics,
    multiprocess_registry,
    prepare_multiprocess_dir,
    start_metrics_server,
)
