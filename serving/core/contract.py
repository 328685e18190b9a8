"""The model contract (stub, completed below): the model card and the file digest."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


# -----------------------------------------------------------------------------------------------------------
# card
class CardMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")
    acc: float | None = None
    nmi: float | None = None
    ari: float | None = None
    dataset: str | None = None
    split: str | None = None
    n: int | None = None


class CardReference(BaseModel):
    """Reference statistics of the validation split, used by drift monitoring."""

    model_config = ConfigDict(extra="allow")
    cluster_hist: list[float] = Field(default_factory=list)
    confidence_quantiles: dict[str, float] = Field(default_factory=dict)


class CardExporter(BaseModel):
    model_config = ConfigDict(extra="allow")
    torch: str | None = None
    onnx: str | None = None
    opset: int | None = None


class CardFile(BaseModel):
    """One served file: the server refuses to start when its sha256 differs from this."""

    bytes: int
    sha256: str
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    agreement_vs_fp32: float | None = None

    @classmethod
    def of(
        cls, path: str | Path, precision: str = "fp32", agreement_vs_fp32: float | None = None
    ) -> CardFile:
        """Measure a file on disk (size and sha256) — what the exporter calls for each file it writes."""
        path = Path(path)
        return cls(
            bytes=path.stat().st_size,
            sha256=sha256_file(path),
            precision=precision,  # type: ignore[arg-type]
            agreement_vs_fp32=agreement_vs_fp32,
        )


class ModelCard(BaseModel):
    """`model_store/<name>/model.json`: metadata facts, file sizes and hashes, the rebuild command."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str
    method: str
    k: int = Field(gt=0)
    input_size: int = Field(gt=0)
    backbone: str
    class_names: list[str] | None = None
    metrics: CardMetrics = Field(default_factory=CardMetrics)
    reference: CardReference = Field(default_factory=CardReference)
    source_sha256: str | None = None
    config_sha256: str | None = None
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    exporter: CardExporter = Field(default_factory=CardExporter)
    files: dict[str, CardFile] = Field(default_factory=dict)
    rebuild_command: str | None = None

    @field_validator("class_names")
    @classmethod
    def _class_names_match_k(cls, value: list[str] | None, info: Any) -> list[str] | None:
        k = info.data.get("k")
        if value is not None and k is not None and len(value) != k:
            raise ValueError(f"class_names has {len(value)} names but k={k}")
        return value

    # ------------------------------------------------------------------------------------------------ file
    # I/O
    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        """Read a card; `path` may be the `model.json` file or the model's store folder."""
        path = Path(path)
        if path.is_dir():
            path = path / "model.json"
        return cls.model_validate_json(path.read_text())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / "model.json"
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")
        return path

    def add_file(
        self, path: str | Path, precision: str = "fp32", agreement_vs_fp32: float | None = None
    ) -> CardFile:
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
