"""The model contract, written once: what an exported deepclust model is (docs/design.md §2).

Why one module: the exporter (`training/export.py`) writes this contract and every host reads it (the engine, the
TorchServe handler, the labeller, the monitor). The ONNX input/output names, the `deepclust.*` metadata keys and the
card (`model.json`) were once spelled in three places; a change here is a change of the contract, made everywhere at
once. Torch-free (pydantic and the standard library only), so the serving image can import it.

- The graph: input `images` uint8 [N, H, W, 3] RGB; outputs `probabilities` float32 [N, K], `cluster` int64 [N],
  `embedding` float32 [N, D].
- `ModelFacts`: what the model is (method, K, input size, class names, metrics, drift reference, digests, versions).
  The same facts are stored twice: as `deepclust.*` metadata_props inside each ONNX file (`ModelMetadata`, read by the
  engine) and in the card beside the files (`ModelCard`, which adds the files' sizes and sha256 and the rebuild
  command).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# ------------------------------------------------------------------------------------------------------ the graph
INPUT_NAME = "images"
INPUT_TYPE = "tensor(uint8)"
OUTPUT_NAMES = ("probabilities", "cluster", "embedding")

# --------------------------------------------------------------------------------------------- the model store
Variant = Literal["fp32", "int8", "fp16"]
VARIANTS: tuple[str, ...] = ("fp32", "int8", "fp16")
VARIANT_FILES: dict[str, str] = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}
CARD_NAME = "model.json"

# ----------------------------------------------------------------------------------------------- the metadata
METADATA_PREFIX = "deepclust."
REQUIRED_KEYS = ("method", "k", "input_size", "backbone")
# Stored as JSON text; every other key is a plain string (a digest made only of digits must stay a string).
JSON_KEYS = frozenset({"class_names", "metrics", "reference", "exporter", "agreement_vs_fp32"})


class Metrics(BaseModel):
    """Clustering quality measured at export on the evaluation split (None without labels)."""

    model_config = ConfigDict(extra="allow")
    acc: float | None = None
    nmi: float | None = None
    ari: float | None = None
    dataset: str | None = None
    split: str | None = None
    n: int | None = None


class Reference(BaseModel):
    """Export-time statistics of the evaluation split, the baseline of drift monitoring."""

    model_config = ConfigDict(extra="allow")
    cluster_hist: list[float] = Field(default_factory=list)
    confidence_quantiles: dict[str, float] = Field(default_factory=dict)


class Exporter(BaseModel):
    """Versions of the tools that wrote the graph."""

    model_config = ConfigDict(extra="allow")
    torch: str | None = None
    onnx: str | None = None
    opset: int | None = None


# Former names of the card's parts (kept: callers and tests know them by these names).
CardMetrics, CardReference, CardExporter = Metrics, Reference, Exporter


class ModelFacts(BaseModel):
    """What a model is: the `deepclust.*` metadata_props of its ONNX files and the head of its card."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    method: str
    k: int = Field(gt=0)
    input_size: int = Field(gt=0)
    backbone: str
    class_names: list[str] | None = None
    metrics: Metrics = Field(default_factory=Metrics)
    reference: Reference = Field(default_factory=Reference)
    source_sha256: str | None = None
    config_sha256: str | None = None
    created_at: str | None = None
    exporter: Exporter = Field(default_factory=Exporter)

    @field_validator("class_names")
    @classmethod
    def _class_names_match_k(cls, value: list[str] | None, info: Any) -> list[str] | None:
        k = info.data.get("k")
        if value is not None and k is not None and len(value) != k:
            raise ValueError(f"class_names has {len(value)} names but k={k}")
        return value

    def facts(self) -> dict[str, Any]:
        """Only the fields of `ModelFacts` (not a card's files or a file's precision), as JSON-ready values."""
        return self.model_dump(mode="json", include=set(ModelFacts.model_fields))

    def to_props(self, **extra: Any) -> dict[str, str]:
        """The facts (plus per-file `extra`, e.g. `precision`) as `deepclust.*` metadata_props."""
        return encode_props({**self.facts(), **extra})


class ModelMetadata(ModelFacts):
    """The facts as read from one ONNX file, plus what is true of that file only (its precision, its agreement)."""

    precision: Variant | None = None
    agreement_vs_fp32: float | None = None

    @classmethod
    def from_props(cls, props: Mapping[str, str]) -> ModelMetadata:
        """Parse `deepclust.*` props (other keys ignored); `ValueError` naming the missing or malformed ones."""
        values = decode_props(props)
        missing = [key for key in REQUIRED_KEYS if key not in values]
        if missing:
            raise ValueError(f"the ONNX model lacks metadata_props {[METADATA_PREFIX + m for m in missing]}")
        return cls.model_validate(values)


def encode_props(values: Mapping[str, Any]) -> dict[str, str]:
    """`{key: value}` → `{"deepclust.key": text}`: strings as they are, JSON for the rest; None scalars left out."""
    props: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, str):
            props[METADATA_PREFIX + key] = value
        elif value is not None or key in JSON_KEYS:
            props[METADATA_PREFIX + key] = json.dumps(value)
    return props


def decode_props(props: Mapping[str, str]) -> dict[str, Any]:
    """The inverse of `encode_props` for the `deepclust.*` keys; `ValueError` on malformed JSON."""
    values: dict[str, Any] = {}
    for key, raw in props.items():
        if not key.startswith(METADATA_PREFIX):
            continue
        name = key[len(METADATA_PREFIX) :]
        if name in JSON_KEYS:
            try:
                values[name] = json.loads(raw) if raw else None
            except json.JSONDecodeError as exc:
                raise ValueError(f"metadata {key} is not valid JSON: {exc}") from exc
        else:
            values[name] = raw
    return values


# ------------------------------------------------------------------------------------------------------ the card
class CardFile(BaseModel):
    """One served file: every host refuses it when its sha256 or size differs from this."""

    bytes: int
    sha256: str
    precision: Variant = "fp32"
    agreement_vs_fp32: float | None = None

    @classmethod
    def of(cls, path: str | Path, precision: str = "fp32", agreement_vs_fp32: float | None = None) -> CardFile:
        """Measure a file on disk (size and sha256): what the exporter records for each file it writes."""
        path = Path(path)
        return cls(
            bytes=path.stat().st_size,
            sha256=sha256_file(path),
            precision=precision,  # type: ignore[arg-type]
            agreement_vs_fp32=agreement_vs_fp32,
        )


class ModelCard(ModelFacts):
    """`model_store/<name>/model.json`: the facts, each file's size and sha256, the command that rebuilds them."""

    name: str
    created_at: str | None = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    files: dict[str, CardFile] = Field(default_factory=dict)
    rebuild_command: str | None = None
    # Variants the export built but did not write because they missed their agreement gate: variant -> why.
    refused_variants: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        """Read a card; `path` may be the `model.json` file or the model's store folder."""
        path = Path(path)
        if path.is_dir():
            path = path / CARD_NAME
        return cls.model_validate_json(path.read_text())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / CARD_NAME
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")
        return path

    def add_file(self, path: str | Path, precision: str = "fp32", agreement_vs_fp32: float | None = None) -> CardFile:
        entry = CardFile.of(path, precision, agreement_vs_fp32)
        self.files[Path(path).name] = entry
        return entry

    def verify_file(self, path: str | Path) -> None:
        """Raise a clear `ValueError` unless `path` is in the card with the same sha256 and size."""
        path = Path(path)
        entry = self.files.get(path.name)
        if entry is None:
            raise ValueError(f"{path.name} is not listed in the model card's files ({sorted(self.files)})")
        digest = sha256_file(path)
        if digest != entry.sha256 or path.stat().st_size != entry.bytes:
            raise ValueError(
                f"{path}: sha256 {digest[:12]}… ({path.stat().st_size} bytes) does not match the model card "
                f"({entry.sha256[:12]}…, {entry.bytes} bytes); the file was changed after export — "
                f"rebuild it with: {self.rebuild_command or 'deepclust export'}"
            )


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
