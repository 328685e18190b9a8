"""The one inference engine every host uses (TorchServe handler, labeller, evaluation job): ONNX → onnxruntime.

Why one engine: the provider choice, the thread settings, the batching and the reading of the model's metadata are
decided once, so that a cluster id means the same thing in every host. No torch here (docs/design.md §1); the graph's
names and metadata come from `serving.core.contract`.

Provider choice: the configured preference (default TensorRT → CUDA → CPU) is filtered by what onnxruntime lists AND by
a real session creation, because `onnxruntime-gpu` lists CUDA/TensorRT on machines where their libraries or a GPU are
missing and then silently falls back. `Engine.provider` reports the provider that actually runs
(`session.get_providers()[0]`). A failed accelerator is never silent: onnxruntime's own reason (its native log,
captured from the process's stderr while probing, or the exception) is kept in `Engine.fallback_reasons` and logged
at WARNING; with `require_gpu=True` the engine refuses to start on CPU (`GpuUnavailableError`, reason included).
TensorRT is not in the default list: its provider needs libnvinfer (absent from the CUDA runtime image) and, to be
usable, engine/timing caches and shape profiles that are not configured here.

Batch shapes: batches larger than `max_batch` are split into chunks. On a GPU provider every chunk is padded up to
the next of a few fixed sizes (`batch_buckets`: powers of two up to `max_batch`, and `max_batch`) and warm-up runs
each of them once: the server forms batches of any size from 1 to `max_batch` (several requests, several images
each), and every new input shape costs cuDNN a convolution-plan setup and the memory arena a new allocation on a live
request. Seven shapes (for 64) are all warmed in start-up; 64 distinct sizes would be 64 warm-up runs, and padding
costs at most 2x the arithmetic of a batch that is small anyway. On CPU nothing is padded: the CPU provider has no
per-shape search and its cost grows with every padded image.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort

from serving.core.contract import INPUT_NAME, INPUT_TYPE, OUTPUT_NAMES, ModelMetadata, sha256_file
from serving.core.results import Assignment, TopK

log = logging.getLogger("deepclust.engine")

PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


class EngineOutput(NamedTuple):
    probabilities: np.ndarray  # float32 [N, K]
    cluster: np.ndarray  # int64 [N]
    embedding: np.ndarray  # float32 [N, D]


def resolve_providers(preference: Sequence[str]) -> list[str]:
    """Map short names (`tensorrt`, `cuda`, `cpu`) or full onnxruntime names to the ones this build lists."""
    available = set(ort.get_available_providers())
    resolved: list[str] = []
    for name in preference:
        full = PROVIDER_NAMES.get(name.lower(), name)
        if full in available and full not in resolved:
            resolved.append(full)
    if "CPUExecutionProvider" not in resolved:
        resolved.append("CPUExecutionProvider")
    return resolved


EXACT_INT8 = ("session.x64quantprecision", "1")
"""onnxruntime's uint8 x int8 kernels on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) add pairs of products in
int16 with saturation: there an INT8 graph computes something else than on a VNNI CPU and than its exact integer
simulation (a QLinearConv of 64 channels at 255 x 127 gives half the exact value). This session setting makes them use
onnxruntime's exact uint8 x uint8 kernels on those CPUs; it changes nothing on VNNI CPUs nor for float graphs. So the
agreement an INT8 file's gate measured at export holds on every CPU. Every session of ours sets it (`session_options`):
the engine's, the export's gates, the quantizer's trials, the benchmarks and the tests. What it costs on an AVX2 CPU:
`benchmarks/int8_exact.py`."""


def session_options(threads: int = 0, *, exact_int8: bool = True) -> ort.SessionOptions:
    """Our CPU session settings: all graph optimisations, `threads` intra-op threads (0: onnxruntime's choice), one
    inter-op thread, quiet, `EXACT_INT8` (off only to measure what it costs)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = max(0, int(threads))
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if exact_int8:
        options.add_session_config_entry(*EXACT_INT8)
    return options


def cpu_session(model: str | Path | bytes, threads: int = 0, *, exact_int8: bool = True) -> ort.InferenceSession:
    """A CPU session with the engine's arithmetic, for a model file or serialized bytes: whatever is compared with
    what the engine serves (export gates, quantizer trials, benchmarks, tests) runs through this."""
    source = model if isinstance(model, bytes) else str(model)
    options = session_options(threads, exact_int8=exact_int8)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


DEFAULT_PROVIDERS = ("cuda", "cpu")
GPU_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider"})
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class GpuUnavailableError(RuntimeError):
    """`require_gpu` was set and no GPU provider could run the model; the message carries onnxruntime's reason."""

    def __init__(self, message: str, reasons: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.reasons = dict(reasons or {})  # accelerator → onnxruntime's reason


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The padded batch sizes on a GPU provider: powers of two below `max_batch`, and `max_batch` itself."""
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    return tuple(sorted({1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch} | {max_batch}))


@contextlib.contextmanager
def _capture_onnxruntime(log_lines: list[str]):
    """Keep a failed provider's messages (onnxruntime's native log on fd 2, Python's 'EP Error') off the terminal but
    hand them to the caller: they are the reason for the fallback."""
    ort.set_default_logger_severity(3)
    sink = io.StringIO()
    with tempfile.TemporaryFile() as native:
        saved = os.dup(2)
        os.dup2(native.fileno(), 2)
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            ort.set_default_logger_severity(2)
            native.seek(0)
            text = native.read().decode("utf-8", "replace") + sink.getvalue()
            log_lines.extend(line.strip() for line in _ANSI.sub("", text).splitlines() if line.strip())


class Engine:
    """An onnxruntime session on one deepclust ONNX model with its metadata; safe to call from threads."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        providers: Sequence[str] = DEFAULT_PROVIDERS,
        intra_op_threads: int = 0,
        max_batch: int = 64,
        warmup: bool = True,
        spin: bool = True,
        require_gpu: bool = False,
        device_id: int = 0,
        pad_batches: bool | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        # Busy-waiting intra-op threads are fastest on idle cores but stall when the host shares its cores with other
        # work (the labeller's decode workers): `spin=False` lets them sleep.
        self.spin = spin
        if not self.model_path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.model_path}")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.max_batch = max_batch
        self.device_id = device_id  # the GPU of this worker (TorchServe's gpu_id)
        self.intra_op_threads = intra_op_threads
        self.fallback_reasons: dict[str, str] = {}  # accelerator → why it did not run (onnxruntime's words)
        self.session, self.provider = self._open_session(resolve_providers(providers), providers)
        if require_gpu and self.provider == "CPUExecutionProvider":
            reasons = "; ".join(f"{name}: {why}" for name, why in self.fallback_reasons.items())
            raise GpuUnavailableError(
                f"require_gpu is set but no GPU provider runs {self.model_path.name} "
                f"(asked for {list(providers)}): {reasons or 'onnxruntime lists no GPU provider in this build'}",
                self.fallback_reasons,
            )
        # Fixed batch shapes on a GPU (module docstring); `pad_batches` forces it either way (tests, benchmarks).
        self.pad_batches = self.provider in GPU_PROVIDERS if pad_batches is None else bool(pad_batches)
        self.buckets = batch_buckets(max_batch) if self.pad_batches else ()
        self.warmed_batches: list[int] = []
        self.metadata = ModelMetadata.from_props(self.session.get_modelmeta().custom_metadata_map)
        self._check_contract()
        self.input_size = self.metadata.input_size
        self.k = self.metadata.k
        log.info(
            "engine ready",
            extra={
                "model": str(self.model_path),
                "provider": self.provider,
                "k": self.k,
                "input_size": self.input_size,
                "max_batch": max_batch,
                "buckets": list(self.buckets),
            },
        )
        if warmup:
            self.warmup()

    # ---------------------------------------------------------------------------------------------------
    # setup
    def _session_options(self, provider: str = "CPUExecutionProvider") -> ort.SessionOptions:
        """Session options; on a GPU provider the CPU threads only run a few fallback ops, so they never busy-wait
        (spinning would take the cores the handler's image decoding needs)."""
        options = session_options(self.intra_op_threads)
        if not self.spin or provider in GPU_PROVIDERS:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def _open_session(self, candidates: list[str], asked: Sequence[str] = ()) -> tuple[ort.InferenceSession, str]:
        """Try each accelerator in order with a real session; the first that actually runs wins, CPU last. Every
        accelerator that was asked for but did not run gets its reason recorded and logged at WARNING."""
        available = set(candidates)
        for name in asked:
            full = PROVIDER_NAMES.get(name.lower(), name)
            if full != "CPUExecutionProvider" and full not in available:
                self.fallback_reasons[full] = "not in this onnxruntime build (onnxruntime-gpu is needed)"
        for provider in candidates:
            if provider == "CPUExecutionProvider":
                break
            lines: list[str] = []
            try:
                with _capture_onnxruntime(lines):
                    session = ort.InferenceSession(
                        str(self.model_path),
                        self._session_options(provider),
                        providers=[(provider, provider_options(provider, self.device_id)), "CPUExecutionProvider"],
                    )
            except Exception as exc:  # noqa: BLE001 - the reason is recorded and logged below
                self.fallback_reasons[provider] = _reason(lines, str(exc))
                continue
            running = session.get_providers()[0]
            if running == provider:
                return session, running
            self.fallback_reasons[provider] = _reason(lines, "listed by onnxruntime but did not start")
        for provider, why in self.fallback_reasons.items():
            log.warning("provider %s did not start, running on CPU: %s", provider, why)
        session = ort.InferenceSession(
            str(self.model_path), self._session_options(), providers=["CPUExecutionProvider"]
        )
        return session, session.get_providers()[0]

    def _check_contract(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        if INPUT_NAME not in inputs or inputs[INPUT_NAME].type != INPUT_TYPE:
            raise ValueError(f"{self.model_path}: expected a uint8 input named '{INPUT_NAME}', got {list(inputs)}")
        outputs = [o.name for o in self.session.get_outputs()]
        missing = [name for name in OUTPUT_NAMES if name not in outputs]
        if missing:
            raise ValueError(f"{self.model_path}: missing outputs {missing} (has {outputs})")

    def warmup(self, batch: int | None = None) -> None:
        """Run every batch shape a request can reach, so that no live request pays a shape's first-run cost: each
        padded size on a GPU (`buckets`), the largest batch on CPU (its allocation). `batch` warms that one size."""
        sizes = [min(self.max_batch, batch)] if batch else list(self.buckets or (self.max_batch,))
        for n in sizes:
            self.run(np.zeros((n, self.input_size, self.input_size, 3), dtype=np.uint8))
            self.warmed_batches.append(n)

    @cached_property
    def sha256(self) -> str:
        return sha256_file(self.model_path)

    @property
    def name(self) -> str:
        return self.model_path.parent.name

    # -----------------------------------------------------------------------------------------------
    # inference
    def run(self, images: np.ndarray) -> EngineOutput:
        """uint8 [N, S, S, 3] → probabilities, cluster, embedding; N above `max_batch` is run in chunks."""
        images = np.asarray(images)
        size = self.input_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"expected uint8 [N, {size}, {size}, 3], got {images.dtype} {list(images.shape)}")
        if len(images) == 0:
            return EngineOutput(
                np.zeros((0, self.k), np.float32), np.zeros((0,), np.int64), np.zeros((0, 0), np.float32)
            )
        parts = []
        for start in range(0, len(images), self.max_batch):
            chunk = np.ascontiguousarray(images[start : start + self.max_batch])
            n = len(chunk)
            padded = self.padded_size(n)
            if padded > n:  # zero images fill the batch up to its bucket; their outputs are dropped
                chunk = np.concatenate([chunk, np.zeros((padded - n, *chunk.shape[1:]), np.uint8)])
            outputs = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: chunk})
            parts.append([out[:n] for out in outputs] if padded > n else outputs)
        if len(parts) == 1:
            return EngineOutput(*parts[0])
        return EngineOutput(*(np.concatenate([p[i] for p in parts]) for i in range(3)))

    def padded_size(self, n: int) -> int:
        """The batch size `n` images run at: the smallest bucket that holds them (n itself when not padding)."""
        return next((b for b in self.buckets if b >= n), n)

    def predict(self, images: np.ndarray, top_k: int = 0) -> list[Assignment]:
        return assign(self.run(images), self.metadata.class_names, top_k=top_k)

    def describe(self) -> dict[str, Any]:
        return {
            "model": str(self.model_path),
            "provider": self.provider,
            "k": self.k,
            "input_size": self.input_size,
            "max_batch": self.max_batch,
            "buckets": list(self.buckets),
            "precision": self.metadata.precision,
            "device_id": self.device_id if self.provider in GPU_PROVIDERS else None,
            "method": self.metadata.method,
            "backbone": self.metadata.backbone,
            "threads": self.intra_op_threads or os.cpu_count(),
        }


def _reason(lines: list[str], fallback: str) -> str:
    """onnxruntime's own words for a failed provider: its error lines (the library that failed to load, the CUDA
    error), else the exception text."""
    errors = [line for line in lines if "[E:" in line or "Error" in line or "FAIL" in line]
    text = " | ".join(errors or lines) or fallback
    return text[-1500:]


def provider_options(provider: str, device_id: int = 0) -> dict[str, str]:
    """The options handed to onnxruntime for an accelerator, chosen on purpose (unit-tested):
    - CUDA: `cudnn_conv_algo_search=HEURISTIC` (the default EXHAUSTIVE benchmarks every new input shape on a live
      request: a latency spike per new batch size after each rollout); the BFCArena grows by what is requested
      (`kSameAsRequested`), not by powers of two, so several workers share one GPU; `device_id` is the worker's GPU
      (TorchServe's `gpu_id`); `do_copy_in_default_stream` keeps copies ordered with compute; `use_tf32=0`: the
      FP32 file computes in FP32 as its export parity check did (TF32 convolutions keep 10 mantissa bits; the
      fast GPU variant is the FP16 file, whose agreement the export measures).
    - TensorRT (only when asked for; not in the default list): no options, so no engine cache and no shape profiles.
    - others: none.
    Every key and value is a string of the onnxruntime-gpu build's CUDA provider (a test reads them from its
    library)."""
    if provider == "CUDAExecutionProvider":
        return {
            "device_id": str(int(device_id)),
            "cudnn_conv_algo_search": "HEURISTIC",
            "arena_extend_strategy": "kSameAsRequested",
            "do_copy_in_default_stream": "1",
            "use_tf32": "0",
        }
    return {}


def assign(output: EngineOutput, class_names: list[str] | None, top_k: int = 0) -> list[Assignment]:
    """Post-processing: cluster id (the model's argmax), confidence = max probability, label, top-k."""
    probabilities = np.asarray(output.probabilities, dtype=np.float32)
    clusters = np.asarray(output.cluster).astype(np.int64)
    confidences = probabilities[np.arange(len(clusters)), clusters] if len(clusters) else np.zeros(0)
    names = list(class_names) if class_names else None

    def label_of(cluster: int) -> str | None:
        return names[cluster] if names is not None and 0 <= cluster < len(names) else None

    results: list[Assignment] = []
    top = min(int(top_k), probabilities.shape[1]) if top_k and probabilities.ndim == 2 else 0
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top] if top else None
    for i, cluster in enumerate(clusters.tolist()):
        top_list = None
        if order is not None:
            top_list = [
                TopK(cluster=int(c), probability=float(probabilities[i, c]), label=label_of(int(c))) for c in order[i]
            ]
        results.append(
            Assignment(cluster=cluster, confidence=float(confidences[i]), label=label_of(cluster), top_k=top_list)
        )
    return results
