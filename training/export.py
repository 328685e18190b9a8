"""Export a checkpoint to the served ONNX artifact (docs/design.md §2), check it, and build its variants.

The graph takes decoded uint8 pixels (N×H×W×3, RGB) and does the float conversion, layout change and normalisation
itself, so every client sends the same thing and no client can get the normalisation wrong. The export fails loudly
when the graph disagrees with torch eager on real evaluation images. The names of the graph's input and outputs, the
metadata and the card are the serving side's contract (`serving.core.contract`), written here and read by every host.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from tqdm import tqdm

from serving.core.contract import (
    INPUT_NAME,
    METADATA_PREFIX,
    OUTPUT_NAMES,
    ModelCard,
    ModelFacts,
    encode_props,
    sha256_file,
)
from serving.core.engine import cpu_session
from serving.core.preprocess import resize_for_model
from serving.core.quality import evaluate_clustering
from training.config import TrainConfig
from training.data.datasets import ImageDataset, create_dataset
from training.defaults import CALIBRATION_IMAGES, PARITY_IMAGES
from training.models.heads import ClusteringModel
from training.onnx_graph import fold_pads
from training.qat import FineTune
from training.quantize import quantize_int8

log = logging.getLogger("deepclust.export")
T = TypeVar("T")

OPSET = 17
PARITY_MAX_ABS = 1e-4
INT8_MIN_AGREEMENT = 0.99
# The held-out choice of the float convolutions asks for this much more than the gate: 2,000 images estimate the
# agreement to about +-0.002, and a choice that scored exactly 0.990 there measured 0.987 on the 10,000 test images.
INT8_SELECTION_MARGIN = 0.005
# FP16 must serve the FP32 clusters as INT8 must (the same gate); measured on the GPU provider that runs FP16 when
# the exporting machine has one, else on CPU as a check of the conversion only (the card then says so).
FP16_MIN_AGREEMENT = 0.99
FP16_GPU_PROVIDERS = ("cuda",)
QUANTILES = [0.01, *[round(q, 2) for q in np.arange(0.05, 0.951, 0.05)], 0.99]


class ExportError(RuntimeError):
    """The exported graph is not a faithful copy of the checkpoint (or a variant is not good enough)."""


class ServingGraph(nn.Module):
    """uint8 NHWC -> (probabilities [N,K], cluster [N] int64, embedding [N,D])."""

    def __init__(self, model: ClusteringModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        probabilities, embedding = self.model(x)
        return probabilities, probabilities.argmax(dim=1), embedding


def export_graph(model: ClusteringModel, input_size: int, path: Path, opset: int = OPSET) -> Path:
    """Write the FP32 graph with a dynamic batch dimension (TorchScript exporter: mature for CNNs). The TF-"SAME"
    pads of the tf_* backbones, which the exporter computes from the input's shape at run time, are folded to
    constants (the spatial size is fixed): onnxruntime then fuses each Pad into its Conv instead of padding in a
    separate pass between layout changes (on cifar10-lite0 the Pad and layout nodes took 31 % of the FP32 time; see
    the README's engine section)."""
    graph = ServingGraph(model).eval()
    example = torch.zeros(2, input_size, input_size, 3, dtype=torch.uint8)
    with torch.inference_mode():
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)},
            opset_version=opset,
            do_constant_folding=True,
        )
    fold_pads(path, path, example[:1].numpy())
    onnx.checker.check_model(str(path), full_check=True)
    return path


def write_metadata(path: Path, values: dict[str, Any]) -> None:
    """Set the `deepclust.*` metadata_props from un-prefixed `values` (encoded by the contract), replacing earlier
    ones."""
    proto = onnx.load(str(path))
    keep = [p for p in proto.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, text in encode_props(values).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, text
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))


def run_onnx(sess: ort.InferenceSession, images: np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    probs, embs = [], []
    for start in range(0, len(images), batch):
        p, _, e = sess.run(list(OUTPUT_NAMES), {INPUT_NAME: images[start : start + batch]})
        probs.append(p)
        embs.append(e)
    return np.concatenate(probs), np.concatenate(embs)


@dataclass
class Parity:
    n: int
    max_abs_diff: float
    agreement: float

    def ok(self) -> bool:
        return self.max_abs_diff <= PARITY_MAX_ABS and self.agreement == 1.0


@torch.inference_mode()
def check_parity(model: ClusteringModel, onnx_path: Path, images: np.ndarray) -> Parity:
    """Torch eager vs onnxruntime on the same uint8 images: max |Δp| and argmax agreement."""
    model.eval()
    eager = []
    for start in range(0, len(images), 64):
        chunk = torch.from_numpy(images[start : start + 64]).permute(0, 3, 1, 2).float() / 255.0
        eager.append(model(chunk)[0].numpy())
    p_eager = np.concatenate(eager)
    p_onnx, _ = run_onnx(cpu_session(onnx_path), images)
    return Parity(
        n=len(images),
        max_abs_diff=float(np.abs(p_eager - p_onnx).max()),
        agreement=float((p_eager.argmax(1) == p_onnx.argmax(1)).mean()),
    )


def require_parity(parity: Parity, what: str) -> None:
    if not parity.ok():
        raise ExportError(
            f"{what}: parity check failed on {parity.n} images: max |Δp| = {parity.max_abs_diff:.2e} "
            f"(limit {PARITY_MAX_ABS:.0e}), argmax agreement = {parity.agreement:.4f} (must be 1.0)"
        )


def uint8_images(dataset: ImageDataset, size: int, indices: np.ndarray | None = None) -> np.ndarray:
    """Decoded evaluation images through the serving pre-processing: uint8 [N, size, size, 3]."""
    indices = np.arange(len(dataset)) if indices is None else indices
    out = np.empty((len(indices), size, size, 3), dtype=np.uint8)
    for row, index in enumerate(tqdm(indices, desc="decode", mininterval=5, leave=False)):
        out[row] = resize_for_model(dataset.load(int(index)), size)
    return out


def evaluation_index(rng: np.random.Generator, total: int, limit: int | None = None) -> np.ndarray:
    """The export's draw of evaluation images (the first draw of its seed-0 `rng`, sorted): all of them, or `limit`.
    `training.requantize` repeats it to gate and check a store model on the same images."""
    return np.sort(rng.choice(total, size=total if limit is None else min(limit, total), replace=False))


def int8_training_images(
    train_set: ImageDataset,
    size: int,
    rng: np.random.Generator,
    calibration_images: int,
    selection_images: int,
    fine_tune_images: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Three disjoint draws of training images for INT8 (label-free): calibration, the held-out images that choose
    the float nodes (the gate is then measured on the evaluation set), and the fine-tuning images (None if 0). The
    first two do not depend on `fine_tune_images`. A set smaller than the first two reuses its images (the
    fine-tuning then takes `fine_tune_images` of them)."""
    picked = rng.permutation(len(train_set))[: calibration_images + selection_images + fine_tune_images]
    selection_end = calibration_images + selection_images
    calibration = uint8_images(train_set, size, np.sort(picked[:calibration_images]))
    held = picked[calibration_images:selection_end] if len(picked) > calibration_images else picked
    held_out = uint8_images(train_set, size, np.sort(held))
    tuning = picked[selection_end:] if len(picked) > selection_end else picked[:fine_tune_images]
    fine_tune = uint8_images(train_set, size, np.sort(tuning)) if fine_tune_images else None
    return calibration, held_out, fine_tune


def require_int8_gate(agreement: float, n: int, record: dict[str, Any]) -> float:
    """The INT8 gate, measured on the evaluation set (never used to choose the float convolutions): the agreement,
    once it passes."""
    if agreement < INT8_MIN_AGREEMENT:
        raise ExportError(
            f"INT8 argmax agreement with FP32 is {agreement:.4f} on {n} images (needs >= {INT8_MIN_AGREEMENT}, "
            f"{record['float_convs']} float convolutions); not writing a variant that serves other clusters"
        )
    return agreement


def int8_metadata(props: dict[str, Any], agreement: float, record: dict[str, Any]) -> dict[str, Any]:
    """The INT8 file's metadata: the model's facts, its agreement with FP32 and how it was quantized."""
    return {
        **props,
        "precision": "int8",
        "agreement_vs_fp32": f"{agreement:.6f}",
        "int8_float_convs": str(record["float_convs"]),
        "int8_selection": json.dumps(record),
    }


def convert_fp16(fp32_path: Path, out_path: Path) -> Path:
    """FP16 weights and compute for GPUs; inputs/outputs keep their types (uint8 in, float32/int64 out)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True, op_block_list=["ArgMax"])
    _topological_sort(proto.graph)  # the converter appends output casts after their consumers
    onnx.save(proto, str(out_path))
    onnx.checker.check_model(str(out_path))
    return out_path


@dataclass
class Fp16Gate:
    """The FP16 agreement check: on which provider it ran and whether that is the GPU that will serve the file."""

    provider: str | None
    n: int
    agreement: float | None
    on_gpu: bool
    error: str | None = None

    @property
    def served_agreement(self) -> float | None:
        """A file's `agreement_vs_fp32` is on the provider that serves it: None when no GPU measured FP16."""
        return self.agreement if self.on_gpu else None

    def record(self) -> dict[str, Any]:
        """What the card and the FP16 file's metadata say about it (`fp16_gate`)."""
        if self.on_gpu:
            note = f"measured on {self.provider}, the provider that serves FP16"
        else:
            note = (
                "unmeasured on a GPU: no GPU provider ran at export; the agreement was measured on "
                f"{self.provider or 'no provider'}, which computes most FP16 operators in FP32, so it checks the "
                "conversion, not GPU FP16 arithmetic. Measure it on the GPU: python benchmarks/gpu.py"
            )
        return {
            "provider": self.provider,
            "gpu": "measured" if self.on_gpu else "unmeasured",
            "n": self.n,
            "agreement_vs_fp32": None if self.agreement is None else round(self.agreement, 6),
            "min_agreement": FP16_MIN_AGREEMENT,
            "note": note,
            **({"error": self.error} if self.error else {}),
        }


def measure_fp16(fp16_path: Path, images: np.ndarray, p_fp32: np.ndarray) -> Fp16Gate:
    """Argmax agreement of the FP16 file with the FP32 probabilities on the provider that will serve it: a GPU
    provider when one starts here (the serving engine decides, with its CUDA options), else CPU. The file must carry
    its metadata (the engine reads it). Refuses (`ExportError`) below `FP16_MIN_AGREEMENT` on either provider; a
    conversion that cannot even run is recorded, not hidden."""
    from serving.core.engine import GPU_PROVIDERS, Engine

    try:
        engine = Engine(fp16_path, providers=(*FP16_GPU_PROVIDERS, "cpu"), warmup=False, max_batch=64)
        p_fp16 = engine.run(images).probabilities
    except Exception as error:  # noqa: BLE001 - report, do not hide: the card says it was not measured
        log.warning(json.dumps({"event": "fp16_unmeasured", "error": str(error)[:300]}))
        return Fp16Gate(None, len(images), None, False, str(error)[:300])
    gate = Fp16Gate(engine.provider, len(images), _agreement(p_fp32, p_fp16), engine.provider in GPU_PROVIDERS)
    log.info(json.dumps({"event": "fp16_gate", **gate.record()}))
    if gate.agreement < FP16_MIN_AGREEMENT:
        raise ExportError(
            f"FP16 argmax agreement with FP32 is {gate.agreement:.4f} on {gate.n} images on {gate.provider} "
            f"(needs >= {FP16_MIN_AGREEMENT}); not writing a variant that serves other clusters"
        )
    return gate


def _topological_sort(graph: onnx.GraphProto) -> None:
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ExportError("FP16 graph has a cycle or a dangling input")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if n not in ready]
    del graph.node[:]
    graph.node.extend(ordered)


def _agreement(reference: np.ndarray, other: np.ndarray) -> float:
    return float((reference.argmax(1) == other.argmax(1)).mean())


def _reference_stats(probabilities: np.ndarray, k: int) -> dict[str, Any]:
    clusters = probabilities.argmax(1)
    hist = np.bincount(clusters, minlength=k) / max(len(clusters), 1)
    confidence = probabilities.max(1)
    return {
        "cluster_hist": [round(float(h), 6) for h in hist],
        "confidence_quantiles": {f"{q:g}": round(float(np.quantile(confidence, q)), 6) for q in QUANTILES},
        "n": int(len(clusters)),
        "mean_confidence": round(float(confidence.mean()), 6),
    }


@dataclass
class ExportResult:
    out_dir: Path
    card: ModelCard
    parity: Parity
    int8_agreement: float | None
    fp16_agreement: float | None  # on the provider named by fp16_gate (a GPU only when one ran at export)
    fp16_gate: dict[str, Any] | None = None
    refused: dict[str, str] = field(default_factory=dict)  # optional variants left out: variant -> why


def _gated(variant: str, gate: Callable[[], T], required: bool, refused: dict[str, str]) -> T | None:
    """What a variant's gate returns when it passes. A required variant's miss fails the export; an optional one's
    returns None (recorded in `refused`, logged), so that a default export still yields the FP32 model it can
    always serve."""
    try:
        return gate()
    except ExportError as miss:
        if required:
            raise
        refused[variant] = str(miss)
        log.warning(json.dumps({"event": "variant_refused", "variant": variant, "reason": str(miss)}))
        return None


def build_fp16(
    fp32_path: Path, out_path: Path, props: dict[str, Any], images: np.ndarray, p_fp32: np.ndarray
) -> Fp16Gate:
    """The FP16 variant of `fp32_path` with its metadata and its gate (`measure_fp16` on `images`)."""
    fp16 = convert_fp16(fp32_path, out_path)
    write_metadata(fp16, {**props, "precision": "fp16"})  # the engine that measures it reads the metadata
    gate = measure_fp16(fp16, images, p_fp32)
    served = gate.served_agreement
    write_metadata(
        fp16,
        {
            **props,
            "precision": "fp16",
            "agreement_vs_fp32": "null" if served is None else f"{served:.6f}",
            "fp16_gate": json.dumps(gate.record()),
        },
    )
    return gate


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    variants: tuple[str, ...] = ("int8",),
    optional_variants: tuple[str, ...] = (),
    parity_images: int = PARITY_IMAGES,
    calibration_images: int = CALIBRATION_IMAGES,
    selection_images: int = 2000,
    eval_limit: int | None = None,
    rebuild_command: str | None = None,
    fine_tune_images: int = 0,
    fine_tune_epochs: int = FineTune.epochs,
) -> ExportResult:
    """Checkpoint -> `out_dir/model.onnx` (+ variants) + `model.json`, checked for parity and agreement. With
    `fine_tune_images`, the INT8 variant's weights are fine-tuned on that many training images (`training.qat`).
    A variant in `variants` must pass its gate or the export fails; one in `optional_variants` is written only if
    it passes (`ExportResult.refused` and the card's `refused_variants` say why not)."""
    from training.trainer import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    model, config, _ = load_checkpoint(path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = config.data.image_size
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        fp32 = export_graph(model, size, staging / "model.onnx")

        eval_set = create_dataset(config.data.dataset, config.data.eval_split, config.data.root)
        rng = np.random.default_rng(0)
        eval_index = evaluation_index(rng, len(eval_set), eval_limit)
        eval_images = uint8_images(eval_set, size, eval_index)

        parity = check_parity(model, fp32, eval_images[: max(parity_images, 1)])
        require_parity(parity, str(path))
        log.info(json.dumps({"event": "parity", **parity.__dict__}))

        fp32_session = cpu_session(fp32)  # the graph, before its metadata is written: also the INT8 reference below
        p_fp32, _ = run_onnx(fp32_session, eval_images)
        metrics, class_names = _metrics_and_names(config, eval_set, eval_index, p_fp32)
        facts = _facts(config, path, metrics, class_names, _reference_stats(p_fp32, config.model.k))
        props = facts.facts()  # the same facts go into every file's metadata and into the card
        write_metadata(fp32, {**props, "precision": "fp32"})

        card = ModelCard(
            name=out_dir.name,
            **props,
            rebuild_command=rebuild_command or f"deepclust export {checkpoint} -o {out_dir}",
            parity={"n": parity.n, "max_abs_diff": parity.max_abs_diff, "agreement": parity.agreement},
        )
        outputs = {"model.onnx": ("fp32", None)}

        int8_agreement = fp16_agreement = None
        fp16_gate: dict[str, Any] | None = None
        refused: dict[str, str] = {}
        if "int8" in variants or "int8" in optional_variants:
            train_set = create_dataset(config.data.dataset, config.data.train_split, config.data.root)
            calibration, held_out, fine_tune = int8_training_images(
                train_set, size, rng, calibration_images, selection_images, fine_tune_images
            )
            p_held_out, _ = run_onnx(fp32_session, held_out)
            int8 = staging / "model.int8.onnx"
            quantized = quantize_int8(
                fp32,
                int8,
                calibration,
                held_out,
                INT8_MIN_AGREEMENT + INT8_SELECTION_MARGIN,
                reference=p_held_out,
                fine_tune=None if fine_tune is None else FineTune(fine_tune, epochs=fine_tune_epochs),
            )
            p_int8, _ = run_onnx(cpu_session(int8), eval_images)
            int8_agreement = _agreement(p_fp32, p_int8)
            gate = partial(require_int8_gate, int8_agreement, len(eval_images), quantized.record)
            if _gated("int8", gate, "int8" in variants, refused) is not None:
                write_metadata(int8, int8_metadata(props, int8_agreement, quantized.record))
                card.int8_selection = quantized.record  # the card's own record (ModelCard keeps extra fields)
                outputs["model.int8.onnx"] = ("int8", int8_agreement)
        if "fp16" in variants or "fp16" in optional_variants:
            n = max(parity_images, 1)
            build = partial(build_fp16, fp32, staging / "model.fp16.onnx", props, eval_images[:n], p_fp32[:n])
            if (fp16 := _gated("fp16", build, "fp16" in variants, refused)) is not None:
                fp16_agreement, fp16_gate = fp16.agreement, fp16.record()
                outputs["model.fp16.onnx"] = ("fp16", fp16.served_agreement)
                card.fp16_gate = fp16_gate  # the card's own record (ModelCard keeps extra fields)
        card.refused_variants = refused

        for name, (precision, agreement) in outputs.items():
            shutil.move(str(staging / name), out_dir / name)
            card.add_file(out_dir / name, precision, agreement)
    card.save(out_dir / "model.json")
    log.info(json.dumps({"event": "exported", "out_dir": str(out_dir), "files": sorted(outputs)}))
    return ExportResult(out_dir, card, parity, int8_agreement, fp16_agreement, fp16_gate, refused)


def _metrics_and_names(
    config: TrainConfig, eval_set: ImageDataset, eval_index: np.ndarray, probabilities: np.ndarray
) -> tuple[dict[str, Any], list[str] | None]:
    clusters = probabilities.argmax(1)
    labels = eval_set.labels[eval_index]
    metrics: dict[str, Any] = {"dataset": config.data.dataset, "split": config.data.eval_split, "n": int(len(clusters))}
    if not (labels >= 0).all() or not eval_set.class_names:
        return {**metrics, "acc": None, "nmi": None, "ari": None}, None
    report = evaluate_clustering(labels, clusters)
    names = [eval_set.class_names[report.mapping.get(c, 0)] for c in range(config.model.k)]
    # Clusters that never fired have no evidence for a name; keep the map total but say so.
    unseen = [c for c in range(config.model.k) if c not in report.mapping]
    names = [f"cluster-{c}" if c in unseen else name for c, name in enumerate(names)]
    metrics.update(acc=round(report.acc, 6), nmi=round(report.nmi, 6), ari=round(report.ari, 6))
    return metrics, names


def _facts(
    config: TrainConfig,
    checkpoint: Path,
    metrics: dict[str, Any],
    class_names: list[str] | None,
    reference: dict[str, Any],
) -> ModelFacts:
    """What the exported model is, validated by the contract before anything is written."""
    return ModelFacts(
        method=config.method.name,
        k=config.model.k,
        input_size=config.data.image_size,
        backbone=config.model.backbone_name,
        class_names=class_names,
        metrics=metrics,
        reference=reference,
        source_sha256=sha256_file(checkpoint),
        config_sha256=config.digest(),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        exporter={
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "opset": OPSET,
        },
    )
