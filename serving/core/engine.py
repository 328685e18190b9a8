"""The one inference engine every host uses (TorchServe handler, labeller, evaluation job): ONNX → onnxruntime.

Why one engine: the provider choice, the thread settings, the batching and the reading of the model's metadata are
decided once, so that a cluster id means the same thing in every host. No torch here (docs/design.md §1); the graph's
names and metadata come from `serving.core.contract`.

Provider choice: the configured preference (default TensorRT → CUDA → CPU) is filtered by what onnxruntime lists AND by
a real session creation, because `onnxruntime-gpu` lists CUDA/TensorRT on machines where their libraries or a GPU are
missing and then silently falls back. `Engine.provider` reports the provider that actually runs
(`session.get_providers()[0]`), and the failed attempts are kept quiet (they are expected on a CPU machine).
Batches larger than `max_batch` are split into chunks (the model has a dynamic batch axis, so no padding is needed).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
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


@contextlib.contextmanager
def _quiet_onnxruntime():
    """Silence the expected noise of a failed GPU provider (C++ log, Python 'EP Error') while probing."""
    ort.set_default_logger_severity(4)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        ort.set_default_logger_severity(2)


class Engine:
    """An onnxruntime session on one deepclust ONNX model with its metadata; safe to call from threads."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        providers: Sequence[str] = ("tensorrt", "cuda", "cpu"),
        intra_op_threads: int = 0,
        max_batch: int = 64,
        warmup: bool = True,
        spin: bool = True,
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
        self.intra_op_threads = intra_op_threads
        self.session, self.provider = self._open_session(resolve_providers(providers))
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
            },
        )
        if warmup:
            self.warmup()

    # ---------------------------------------------------------------------------------------------------
    # setup
    def _session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = max(0, int(self.intra_op_threads))
        options.inter_op_num_threads = 1
        if not self.spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        return options

    def _open_session(self, candidates: list[str]) -> tuple[ort.InferenceSession, str]:
        """Try each accelerator in order with a real session; the first that actually runs wins, CPU last."""
        for provider in candidates:
            if provider == "CPUExecutionProvider":
                break
            try:
                with _quiet_onnxruntime():
                    session = ort.InferenceSession(
                        str(self.model_path),
                        self._session_options(),
                        providers=[provider, "CPUExecutionProvider"],
                    )
            except Exception as exc:  # a provider that cannot start is expected on CPU machines
                log.debug("provider %s unusable: %s", provider, exc)
                continue
            running = session.get_providers()[0]
            if running == provider:
                return session, running
            log.debug("provider %s listed but not usable here; trying the next one", provider)
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
        """Run once at the largest batch so that the first real request does not pay the allocation cost."""
        n = min(self.max_batch, batch or self.max_batch)
        self.run(np.zeros((n, self.input_size, self.input_size, 3), dtype=np.uint8))

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
            parts.append(self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: chunk}))
        if len(parts) == 1:
            return EngineOutput(*parts[0])
        return EngineOutput(*(np.concatenate([p[i] for p in parts]) for i in range(3)))

    def predict(self, images: np.ndarray, top_k: int = 0) -> list[Assignment]:
        return assign(self.run(images), self.metadata.class_names, top_k=top_k)

    def describe(self) -> dict[str, Any]:
        return {
            "model": str(self.model_path),
            "provider": self.provider,
            "k": self.k,
            "input_size": self.input_size,
            "max_batch": self.max_batch,
            "method": self.metadata.method,
            "backbone": self.metadata.backbone,
            "threads": self.intra_op_threads or os.cpu_count(),
        }


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
