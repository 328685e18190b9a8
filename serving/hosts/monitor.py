"""The evaluation job (`deepclust monitor`): watch a served model with labels or without.

Two modes, one run:
- labelled (`reference_dir`: a folder of class sub-folders; the class is the first path component): ACC, NMI
  and ARI of the model now, and their change from the values the export recorded (`deepclust.metrics`);
- unlabelled (`sample_dir`: any folder of recent images): drift of the cluster distribution (PSI, JS,
  chi-square p) and of the confidence distribution (KS, W1, mean, low-confidence share) against
  `deepclust.reference`.
Either mode can add model-to-model agreement (`compare_model`) and embedding MMD against a baseline folder.

Publishing: gauges named exactly as docs/design.md §4 (labels `model`, `dataset`; the Pushgateway adds
`job`) plus `deepclust_eval_last_success_timestamp_seconds`, pushed with grouping key {model, dataset} so that
runs over different datasets do not replace each other. In labelled mode the export-time ACC/NMI/ARI are
published too, as the same gauges with `dataset="export:<dataset>:<split>"` in their own group: that lets the
ACC-drop alert (k8s/base/prometheus-rules.yaml) compare "now" with "at export" inside Prometheus without a new
metric name. A Prometheus scraping the Pushgateway needs `honor_labels: true` (else `job` becomes
`exported_job`).

The low-confidence threshold is the reference's 5 % confidence quantile (q0.05): under the reference 5 % of
assignments fall below it, for any model and any K, so one alert threshold (25 %) fits every
model.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from serving.core import drift
from serving.core.contract import Variant
from serving.core.model_store import ModelStoreError, resolve_model
from serving.core.quality import evaluate_clustering

log = logging.getLogger("deepclust.monitor")

EVAL_GAUGES = {  # report key → (metric name, help); docs/design.md §4, evaluation job
    "acc": ("deepclust_eval_accuracy", "Clustering accuracy (Hungarian) on the labelled probe set."),
    "nmi": ("deepclust_eval_nmi", "Normalised mutual information on the labelled probe set."),
    "ari": ("deepclust_eval_ari", "Adjusted Rand index on the labelled probe set."),
}
DRIFT_GAUGES = {
    "psi": ("deepclust_drift_psi", "Population stability index of cluster shares vs the export reference."),
    "js_divergence": ("deepclust_drift_js_divergence", "Jensen-Shannon divergence (bits) of cluster shares."),
    "confidence_ks": (
        "deepclust_drift_confidence_ks",
        "KS statistic of max-probability vs the export reference.",
    ),
    "low_confidence_ratio": (
        "deepclust_low_confidence_ratio",
        "Share of assignments below the reference's 5% confidence quantile.",
    ),
}
TIMESTAMP_GAUGE = "deepclust_eval_last_success_timestamp_seconds"
DEFAULT_JOB = "deepclust-monitor"
EXPORT_DATASET_PREFIX = "export:"
LOW_CONFIDENCE_LEVEL = 0.05  # reference quantile used as the low-confidence threshold (see the module doc)
# The alert thresholds of k8s/base/prometheus-rules.yaml (tests/test_monitor.py keeps them equal): a sample is too
# small for a statistic when, without any drift, that statistic would cross its threshold in more than 1 % of runs.
PSI_ALERT = 0.25
LOW_CONFIDENCE_ALERT = 0.25
CONFIDENCE_KS_ALERT = 0.3
ACCURACY_DROP_ALERT = 0.05
SAMPLE_LEVEL = 0.99


class MonitorError(Exception):
    """Bad usage or bad input (exit code 2): a missing folder, a model without a reference, nothing
    decodable."""


class PublishError(Exception):
    """The figures were computed but could not be published (Pushgateway down, textfile not writable)."""


class MonitorConfig(BaseModel):
    """What one run does; validated at the edge (the CLI builds it)."""

    model_config = ConfigDict(protected_namespaces=(), extra="forbid")

    model: Path
    variant: Variant = "fp32"
    reference_dir: Path | None = None
    sample_dir: Path | None = None
    pushgateway: str | None = None
    textfile: Path | None = None
    json_path: Path | None = None
    compare_model: Path | None = None
    embedding_baseline: Path | None = None
    dataset: str | None = None
    job: str = DEFAULT_JOB
    max_images: int | None = None
    seed: int = 0
    low_confidence_threshold: float | None = None
    batch_size: int = 64
    workers: int = 1
    threads: int = 0  # onnxruntime intra-op threads; 0 = the cores available (affinity, cgroup quota)
    progress: Literal["auto", "bar", "log", "none"] = "auto"
    progress_interval: float = 5.0  # seconds between progress lines in "log" mode

    @field_validator("max_images")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("max_images must be >= 1")
        return value

    @model_validator(mode="after")
    def _one_mode(self) -> MonitorConfig:
        if (self.reference_dir is None) == (self.sample_dir is None):
            raise ValueError("give exactly one of --reference (labelled) or --sample (unlabelled)")
        if self.pushgateway and self.textfile:
            raise ValueError("give at most one of --pushgateway or --textfile")
        return self

    @property
    def mode(self) -> str:
        return "labelled" if self.reference_dir is not None else "unlabelled"

    @property
    def folder(self) -> Path:
        folder = self.reference_dir if self.reference_dir is not None else self.sample_dir
        assert folder is not None  # guaranteed by _one_mode
        return folder


# ------------------------------------------------------------------------------------------------- running
@dataclass
class FolderRun:
    """One model over one folder: per good image its path, cluster, confidence, embedding; and the bad
    items."""

    paths: list[str] = field(default_factory=list)
    clusters: list[int] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)


def list_images(folder: Path, *, max_images: int | None, seed: int) -> list[str]:
    """The image files under `folder` in the deterministic walk order of `serving.core.batch`, optionally a seeded
    random subset of `max_images` (kept in walk order) so a big probe set stays a bounded, repeatable job."""
    from serving.core.batch import walk_images

    if not folder.is_dir():
        raise MonitorError(f"not a folder: {folder}")
    paths = list(walk_images(folder))
    if not paths:
        raise MonitorError(f"no image files under {folder}")
    if max_images is not None and len(paths) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(paths), size=max_images, replace=False))
        paths = [paths[i] for i in keep]
    return paths


class Progress:
    """Images done of a pass: a tqdm bar (rate, ETA) on a terminal, else a JSON line on stderr every `interval`
    seconds (CronJob logs), so a long evaluation never looks stuck."""

    def __init__(self, total: int, what: str, mode: str = "auto", interval: float = 5.0) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.total, self.what, self.mode, self.interval = total, what, mode, interval
        self.done = 0
        self.started = self.last = time.monotonic()
        self.bar: Any = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit="img", dynamic_ncols=True, smoothing=0.1)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.mode == "log" and (time.monotonic() - self.last >= self.interval or self.done == self.total):
            self.last = time.monotonic()
            elapsed = self.last - self.started
            rate = self.done / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else None
            line = {"event": "progress", "pass": self.what, "done": self.done, "total": self.total}
            line |= {"images_per_s": round(rate, 1), "eta_s": None if eta is None else round(eta, 1)}
            print(json.dumps(line), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_folder(
    engine: Any,
    folder: Path,
    paths: Sequence[str],
    *,
    batch_size: int = 64,
    workers: int = 1,
    progress: Progress | None = None,
) -> FolderRun:
    """Run the engine over `paths` with the shared batch pipeline (parallel decode, per-item errors)."""
    from serving.core.batch import PipelineOptions, run_files

    options = PipelineOptions(batch_size=batch_size, workers=workers, with_embedding=True)
    run = FolderRun()
    for item in run_files(engine, folder, paths, options):
        if progress is not None:
            progress.update()
        if item.ok:
            run.paths.append(item.rel)
            run.clusters.append(int(item.result.cluster))  # type: ignore[union-attr]
            run.confidence.append(float(item.result.confidence))  # type: ignore[union-attr]
            run.embeddings.append(np.asarray(item.embedding, dtype=np.float32))
        else:
            error = item.result.error  # type: ignore[union-attr]
            run.errors.append({"path": item.path, "code": error.code, "message": error.message})
    if progress is not None:
        progress.close()
    return run


def _open_engine(path: Path, variant: str = "fp32", threads: int = 0) -> tuple[Any, str]:
    """(engine, model name) of a model resolved and card-checked by the model store (same rules as every host)."""
    from serving.core.engine import Engine
    from serving.core.runtime import available_cpus

    try:
        resolved = resolve_model(path, variant)
    except ModelStoreError as exc:
        raise MonitorError(str(exc)) from exc
    try:
        engine = Engine(resolved.file, providers=("cpu",), max_batch=64, intra_op_threads=threads or available_cpus())
        return engine, resolved.name
    except (OSError, ValueError) as exc:
        raise MonitorError(f"cannot load the model {path}: {exc}") from exc


# --------------------------------------------------------------------------------------------------- maths
def drift_report(
    clusters: np.ndarray,
    confidence: np.ndarray,
    k: int,
    reference: dict,
    low_confidence_threshold: float | None = None,
) -> dict[str, Any]:
    """All unlabelled drift figures of one sample against the export reference (`deepclust.reference`)."""
    hist = reference.get("cluster_hist") if reference else None
    quantiles = reference.get("confidence_quantiles") if reference else None
    if not hist or len(hist) != k or not quantiles:
        raise MonitorError(
            "the model's metadata has no usable deepclust.reference (cluster_hist of K values and "
            "confidence_quantiles): re-export it to monitor drift"
        )
    counts = drift.counts_of(clusters, k)
    expected = drift.normalise(hist)
    ref_conf = drift.QuantileReference.from_quantiles(quantiles, low=1.0 / k, high=1.0)
    # The contract always stores q0.05 (the export may store more, e.g. every 0.05 plus 0.01/0.99); the
    # threshold is that quantile, so 5 % of assignments fall below it under the reference, for every model.
    threshold = (
        float(ref_conf.quantile(np.array([LOW_CONFIDENCE_LEVEL]))[0])
        if low_confidence_threshold is None
        else low_confidence_threshold
    )
    chi2 = drift.chi_square_gof(counts, expected)
    return {  # chi2_statistic is None when a cluster the reference never saw appears (p = 0): JSON has no inf
        "n": int(clusters.size),
        "psi": drift.psi(expected, counts),
        "js_divergence": drift.js_divergence(expected, counts),
        "chi2_statistic": chi2.statistic if np.isfinite(chi2.statistic) else None,
        "chi2_dof": chi2.dof,
        "chi2_p_value": chi2.p_value,
        "chi2_min_expected": chi2.min_expected,
        "confidence_ks": drift.ks_statistic(confidence, ref_conf),
        "confidence_ks_lower_bound": drift.ks_lower_bound(confidence, ref_conf),
        "confidence_wasserstein": drift.wasserstein_1(confidence, ref_conf),
        "mean_confidence": drift.mean_confidence(confidence),
        "reference_mean_confidence": float(reference.get("mean_confidence") or ref_conf.mean()),
        "low_confidence_ratio": drift.low_confidence_ratio(confidence, threshold),
        "low_confidence_threshold": threshold,
        "low_confidence_expected_ratio": LOW_CONFIDENCE_LEVEL if low_confidence_threshold is None else None,
        "reference_quantile_levels": ref_conf.stored_levels.tolist(),
        "cluster_shares": (counts / max(counts.sum(), 1)).tolist(),
        "reference_shares": expected.tolist(),
    }


def labelled_report(paths: Sequence[str], clusters: np.ndarray, export_metrics: dict | None) -> dict[str, Any]:
    """ACC/NMI/ARI against the class folders, and their change from the export-time values."""
    class_of = [p.split("/", 1)[0] for p in paths]
    classes = sorted(set(class_of))
    index = {name: i for i, name in enumerate(classes)}
    y_true = np.array([index[c] for c in class_of], dtype=np.int64)
    report = evaluate_clustering(y_true, clusters)
    result: dict[str, Any] = {**report.summary(), "classes": classes, "cluster_sizes": report.cluster_sizes}
    export = (
        {key: export_metrics.get(key) for key in ("acc", "nmi", "ari", "dataset", "split", "n")}
        if export_metrics
        else None
    )
    result["export"] = export
    result["change"] = {
        key: (result[key] - float(export[key])) if export and export.get(key) is not None else None
        for key in ("acc", "nmi", "ari")
    }
    return result


def sample_size_report(report: dict[str, Any], reference: dict | None) -> dict[str, Any]:
    """For each statistic this run publishes: the smallest sample that keeps it below its alert threshold
    without any drift (in `SAMPLE_LEVEL` of runs), and a warning when this sample is smaller (docs in the README).

    Why: a small sample reads as drift by itself (an undrifted sample of 40 images over 10 clusters has an
    expected PSI of 0.32, above the 0.25 alert), so a figure from too few images must say so."""
    n = int(report["n_ok"])
    checks: list[drift.SampleSizeCheck] = []
    if report.get("drift") is not None and reference and reference.get("cluster_hist"):
        hist = reference["cluster_hist"]
        checks += [
            drift.psi_sample_check(hist, n, PSI_ALERT, SAMPLE_LEVEL),
            drift.chi_square_sample_check(hist, n),
            drift.ks_sample_check(n, CONFIDENCE_KS_ALERT, SAMPLE_LEVEL),
        ]
        if report["drift"].get("low_confidence_expected_ratio"):
            checks.append(
                drift.share_sample_check(
                    "low_confidence_ratio", n, LOW_CONFIDENCE_LEVEL, LOW_CONFIDENCE_ALERT, SAMPLE_LEVEL
                )
            )
    labelled = report.get("labelled")
    if labelled is not None:
        export = labelled.get("export") or {}
        accuracy = export.get("acc") if export.get("acc") is not None else labelled["acc"]
        checks.append(drift.accuracy_sample_check(int(labelled["n"]), float(accuracy), ACCURACY_DROP_ALERT))
    rows = []
    for check in checks:
        row = {
            "statistic": check.statistic,
            "n": check.n,
            "min_n": check.min_n,
            "sufficient": check.sufficient,
            "bound": check.bound,
            "level": check.level,
            "undrifted_mean": check.undrifted_mean,
            "undrifted_quantile": check.undrifted_quantile,
            "why": check.why,
        }
        if not check.sufficient:
            row["warning"] = (
                f"{check.n} images are too few for {check.statistic}: it needs at least {check.min_n} ({check.why})"
            )
        rows.append(row)
    return {
        "n": n,
        "sufficient": all(row["sufficient"] for row in rows),
        "min_n": max((row["min_n"] for row in rows), default=0),
        "checks": rows,
    }


def _progress(config: MonitorConfig, total: int, what: str) -> Progress | None:
    if config.progress == "none":
        return None
    return Progress(total, what, config.progress, config.progress_interval)


# ---------------------------------------------------------------------------------------------- publishing
def build_registry(model: str, series: dict[str, dict[str, Any]], *, timestamp: dict[str, float] | None = None) -> Any:
    """A prometheus-client registry: for each dataset label in `series`, one gauge per known figure
    present, all labelled model/dataset; `timestamp` maps dataset labels to their last-success time."""
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry()
    gauges: dict[str, Gauge] = {}
    for dataset, values in series.items():
        for key, (name, help_text) in {**EVAL_GAUGES, **DRIFT_GAUGES}.items():
            if values.get(key) is None:
                continue
            if name not in gauges:
                gauges[name] = Gauge(name, help_text, ["model", "dataset"], registry=registry)
            gauges[name].labels(model=model, dataset=dataset).set(float(values[key]))
    if timestamp:
        gauge = Gauge(
            TIMESTAMP_GAUGE,
            "Unix time of the last successful evaluation run.",
            ["model", "dataset"],
            registry=registry,
        )
        for dataset, value in timestamp.items():
            gauge.labels(model=model, dataset=dataset).set(value)
    return registry


def export_dataset_label(export: dict | None) -> str | None:
    if not export or export.get("acc") is None:
        return None
    return f"{EXPORT_DATASET_PREFIX}{export.get('dataset') or 'unknown'}:{export.get('split') or 'unknown'}"


def publish(report: dict[str, Any], config: MonitorConfig) -> list[str]:
    """Push to the Pushgateway or write the textfile; returns what was done (for the report)."""
    from prometheus_client import push_to_gateway, write_to_textfile

    model, dataset = report["model"], report["dataset"]
    if config.mode == "labelled":  # a probe set's drift goes to the JSON only, not to the alerting gauges
        labelled = report["labelled"]
        figures = {key: labelled[key] for key in EVAL_GAUGES}
        export = labelled.get("export")
        export_label = export_dataset_label(export)
    else:
        figures, export, export_label = dict(report["drift"]), None, None
    now = {dataset: report["finished_at"]}
    done: list[str] = []
    try:
        if config.pushgateway:
            # One push per grouping key: the sample's figures, then the export baseline (no timestamp) if any.
            sample = f"pushed to {config.pushgateway} job={config.job} model={model} dataset={dataset}"
            pushes = [(dataset, build_registry(model, {dataset: figures}, timestamp=now), sample)]
            if export_label:
                baseline = build_registry(model, {export_label: export})
                pushes.append((export_label, baseline, f"pushed export baseline dataset={export_label}"))
            for label, registry, message in pushes:
                push_to_gateway(
                    config.pushgateway,
                    job=config.job,
                    registry=registry,
                    grouping_key={"model": model, "dataset": label},
                    timeout=15,
                )
                done.append(message)
        elif config.textfile:
            series = {dataset: figures, **({export_label: export} if export_label else {})}
            registry = build_registry(model, series, timestamp=now)
            config.textfile.parent.mkdir(parents=True, exist_ok=True)
            write_to_textfile(str(config.textfile), registry)
            done.append(f"wrote {config.textfile}")
    except OSError as exc:  # urllib's URLError/HTTPError are OSErrors
        raise PublishError(f"could not publish the metrics: {exc}") from exc
    return done


# --------------------------------------------------------------------------------------------------- the job
def run_monitor(config: MonitorConfig) -> dict[str, Any]:
    """Do one evaluation run; return the JSON report (also written to `config.json_path` when given).

    Raises `MonitorError` for bad usage/input and `PublishError` when only the publishing failed (the JSON
    report is written before publishing, so the figures are never lost)."""
    started = time.time()
    folder = config.folder
    engine, name = _open_engine(config.model, config.variant, config.threads)
    dataset = config.dataset or folder.resolve().name
    paths = list_images(folder, max_images=config.max_images, seed=config.seed)
    run = run_folder(
        engine,
        folder,
        paths,
        batch_size=config.batch_size,
        workers=config.workers,
        progress=_progress(config, len(paths), config.mode),
    )
    if not run.clusters:
        raise MonitorError(f"none of the {len(paths)} images under {folder} could be decoded")
    clusters = np.asarray(run.clusters, dtype=np.int64)
    confidence = np.asarray(run.confidence, dtype=np.float64)
    metadata = engine.metadata
    report: dict[str, Any] = {
        "model": name,
        "model_path": str(engine.model_path),
        "model_sha256": engine.sha256,
        "dataset": dataset,
        "mode": config.mode,
        "folder": str(folder),
        "n_images": len(paths),
        "n_ok": int(clusters.size),
        "n_errors": len(run.errors),
        "errors": run.errors[:100],
        "labelled": None,
        "drift": None,
    }
    if config.mode == "labelled":
        labelled_paths = [p for p in run.paths if "/" in p]
        loose = [p for p in run.paths if "/" not in p]
        for path in loose:
            report["errors"].append(
                {"path": path, "code": "bad_request", "message": "not inside a class folder: no label"}
            )
        report["n_errors"] += len(loose)
        keep = np.array(["/" in p for p in run.paths])
        if not labelled_paths:
            raise MonitorError(f"{folder} has no images inside class sub-folders")
        exported = metadata.metrics.model_dump() if "metrics" in metadata.model_fields_set else None
        report["labelled"] = labelled_report(labelled_paths, clusters[keep], exported)
    if metadata.reference.cluster_hist:
        try:
            report["drift"] = drift_report(
                clusters, confidence, engine.k, metadata.reference.model_dump(), config.low_confidence_threshold
            )
        except MonitorError:
            if config.mode == "unlabelled":
                raise
    elif config.mode == "unlabelled":
        raise MonitorError("the model has no deepclust.reference metadata: drift cannot be measured")
    if config.compare_model is not None:
        other, other_name = _open_engine(config.compare_model, threads=config.threads)
        other_run = run_folder(
            other,
            folder,
            run.paths,
            batch_size=config.batch_size,
            workers=config.workers,
            progress=_progress(config, len(run.paths), "compare-model"),
        )
        common = sorted(set(run.paths) & set(other_run.paths))
        mine = dict(zip(run.paths, run.clusters, strict=True))
        theirs = dict(zip(other_run.paths, other_run.clusters, strict=True))
        report["agreement"] = {
            "other_model": other_name,
            **drift.model_agreement(np.array([mine[p] for p in common]), np.array([theirs[p] for p in common])),
        }
    if config.embedding_baseline is not None:
        base_paths = list_images(config.embedding_baseline, max_images=drift.MMD_MAX_SAMPLES, seed=config.seed)
        base_run = run_folder(
            engine,
            config.embedding_baseline,
            base_paths,
            batch_size=config.batch_size,
            workers=config.workers,
            progress=_progress(config, len(base_paths), "embedding-baseline"),
        )
        if base_run.embeddings:
            report["embedding_mmd2"] = drift.mmd_rbf(
                np.stack(base_run.embeddings), np.stack(run.embeddings), seed=config.seed
            )
    report["sample_size"] = sample_size_report(report, engine.metadata.reference.model_dump())
    report["warnings"] = [check["warning"] for check in report["sample_size"]["checks"] if check.get("warning")]
    for warning in report["warnings"]:
        log.warning(warning)
    report["started_at"] = started
    report["finished_at"] = time.time()
    report["seconds"] = round(report["finished_at"] - started, 3)
    if config.json_path is not None:
        config.json_path.parent.mkdir(parents=True, exist_ok=True)
        config.json_path.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    report["published"] = publish(report, config)
    log.info(
        "monitor run done",
        extra={
            "model": name,
            "dataset": dataset,
            "mode": config.mode,
            "n_ok": report["n_ok"],
            "n_errors": report["n_errors"],
        },
    )
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, default=_json_default)
