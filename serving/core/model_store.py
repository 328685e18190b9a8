"""The one model-store resolver: folder → variant file → card → sha256 check (docs/design.md §2).

Why one resolver: `deepclust serve` (and its TorchServe handler), `label` and `monitor` all turn "a model" into "this
ONNX file, verified". Written once, they accept the same spellings, call the choice of file `--variant`, and refuse a
file that differs from its card with the same message.

Rules:
- `model` is a folder (`model_store/NAME`, or a bare NAME looked up in the store): the variant picks the file
  (`fp32` → `model.onnx`, `int8` → `model.int8.onnx`, `fp16` → `model.fp16.onnx`); the folder's card (`model.json`) is
  required and must list that file with the same size and sha256.
- `model` is a path to one `.onnx` file: it is used as it is (`variant` does not apply); when a card lies beside it,
  the card must list the file with the same size and sha256. A loose ONNX file without a card has nothing to be
  checked against and is accepted (the label and monitor commands document this).
Every refusal is a `ModelStoreError` (a `ValueError`) whose message says what to do; the CLIs print it and exit 2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ValidationError

from serving.core.contract import CARD_NAME, VARIANT_FILES, VARIANTS, ModelCard

DEFAULT_MODEL = "cifar10-lite0"  # served when the store has no throughput measurements
MIN_SERVICE_IMG_PER_S = 100.0  # the slowest service a default may be: a newcomer's `make serve` must not crawl
THROUGHPUT_FILE = "throughput.json"  # written by `benchmarks/store.py`, beside the model folders


class ModelStoreError(ValueError):
    """A model that cannot be used as asked (missing, unknown variant, no card, changed after export)."""


@dataclass(frozen=True)
class ResolvedModel:
    """A verified model file: where it is, which variant, and its card (None only for a loose ONNX file)."""

    folder: Path
    file: Path
    variant: str
    card: ModelCard | None

    @property
    def name(self) -> str:
        """The model's name: its folder in the store (also the URL's model name)."""
        return self.folder.name


def default_model_store() -> Path:
    """`./model_store` when run from a checkout, else the one beside the installed (editable) package."""
    here = Path.cwd() / "model_store"
    return here if here.is_dir() else Path(__file__).resolve().parents[2] / "model_store"


def model_folder(model: str | Path, store: Path | None = None) -> Path:
    """An existing folder as given; otherwise `model` as a name inside `store` (whether or not it exists)."""
    candidate = Path(model)
    if candidate.is_dir():
        return candidate
    return (store if store is not None else default_model_store()) / str(model)


def variant_file(folder: Path, variant: str) -> Path:
    """The file of `variant` in a store folder (it may not exist)."""
    if variant not in VARIANT_FILES:
        raise ModelStoreError(f"unknown variant {variant!r}: expected one of {' | '.join(VARIANTS)}")
    return folder / VARIANT_FILES[variant]


def load_card(folder: Path) -> ModelCard | None:
    """The card of a folder, None when there is none; `ModelStoreError` when it is unreadable or malformed."""
    path = folder / CARD_NAME
    if not path.is_file():
        return None
    try:
        return ModelCard.load(path)
    except (OSError, ValidationError) as exc:
        raise ModelStoreError(f"{path} is not a valid model card: {exc}") from exc


def resolve_model(model: str | Path, variant: str = "fp32", *, store: Path | None = None) -> ResolvedModel:
    """Resolve and verify `model` (a store folder, a name in `store`, or an .onnx file) for `variant`."""
    given = Path(model)
    if given.is_file():
        card = load_card(given.parent)
        if card is not None:
            _verify(card, given)
        entry = card.files.get(given.name) if card is not None else None
        return ResolvedModel(given.parent, given, entry.precision if entry else variant, card)
    folder = model_folder(model, store)
    if not folder.is_dir():
        where = f", nor a model name in {folder.parent}" if len(given.parts) == 1 else ""
        raise ModelStoreError(
            f"model not found: {model} is neither a model folder (model_store/NAME) nor a .onnx file{where}; "
            "train and export one with `deepclust train` and `deepclust export`"
        )
    file = variant_file(folder, variant)
    card = load_card(folder)
    if not file.is_file():
        present = [v for v in VARIANTS if (folder / VARIANT_FILES[v]).is_file()]
        refused = card.refused_variants.get(variant) if card is not None else None
        why = f"; the export did not write it: {refused}" if refused else ""
        raise ModelStoreError(
            f"{folder} has no {file.name} (variant {variant!r}); variants present: {', '.join(present) or 'none'}{why}"
        )
    if card is None:
        raise ModelStoreError(
            f"{folder} has no model card ({CARD_NAME}), so {file.name} cannot be verified: export the model with "
            "`deepclust export`"
        )
    _verify(card, file)
    return ResolvedModel(folder, file, variant, card)


def _verify(card: ModelCard, file: Path) -> None:
    try:
        card.verify_file(file)
    except ValueError as exc:
        raise ModelStoreError(str(exc)) from exc


class MeasuredModel(BaseModel):
    """One model's service throughput as measured by `benchmarks/store.py` (its variant, on the machine named)."""

    variant: str = "fp32"
    service_img_per_s: float
    acc: float | None = None  # the card's test ACC when measured, repeated for the reader


class StoreThroughput(BaseModel):
    """`model_store/throughput.json`: where and how the store's models were timed, and what each achieved."""

    machine: str
    command: str
    commit: str | None = None
    models: dict[str, MeasuredModel]


def default_model_name(store: Path | None = None, *, min_img_per_s: float = MIN_SERVICE_IMG_PER_S) -> str:
    """The model `deepclust serve` serves when none is named: the most accurate one (card's test ACC) whose measured
    service throughput is at least `min_img_per_s`; ties go to the faster one.

    Why measured and not guessed from FLOPs: the bar is what a user on this kind of machine gets end to end (decode,
    resize, the host's batching). Without a `throughput.json`, or when no measured model clears the bar, the
    historical default `DEFAULT_MODEL` is served (if present), so a fresh store still serves something.
    """
    store = store if store is not None else default_model_store()
    path = store / THROUGHPUT_FILE
    candidates: list[tuple[float, float, str]] = []
    if path.is_file():
        try:
            measured = StoreThroughput.model_validate(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise ModelStoreError(f"{path} is not a valid throughput file: {exc}") from exc
        for name, entry in measured.models.items():
            card = load_card(store / name)
            if card is None or entry.service_img_per_s < min_img_per_s:
                continue
            acc = card.metrics.acc if card.metrics.acc is not None else 0.0
            candidates.append((acc, entry.service_img_per_s, name))
    if candidates:
        return max(candidates)[2]
    return DEFAULT_MODEL
