"""Which file of a model folder to run: `variant: auto` = FP16 on a GPU provider, FP32 on CPU; INT8 only when asked.

Why: FP16 halves the GPU's memory traffic and runs on its tensor cores, while onnxruntime's CPU provider computes
most FP16 operators through casts to FP32 (slower than the FP32 file, nothing gained). INT8 is a CPU choice with its
own agreement gate, so it is never picked for the user. Whether a GPU provider *runs* is only known by opening a
session (`Engine` probes it), so `auto` opens the FP16 file on the GPU providers first and, when none starts, opens
the FP32 file on CPU, carrying the GPU's failure reasons along (they are logged at WARNING by the engine).

Every file goes through `serving.core.model_store.resolve_model`, so its sha256 is checked against the card as for
an explicit `--variant`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from serving.core.contract import VARIANT_FILES, VARIANTS
from serving.core.engine import DEFAULT_PROVIDERS, GPU_PROVIDERS, Engine, GpuUnavailableError, resolve_providers
from serving.core.model_store import resolve_model

log = logging.getLogger("deepclust.engine")

AUTO = "auto"
CHOICES: tuple[str, ...] = (AUTO, *VARIANTS)


def present_variants(folder: Path) -> list[str]:
    """The variants whose file exists in a store folder, in `VARIANTS` order."""
    return [v for v in VARIANTS if (Path(folder) / VARIANT_FILES[v]).is_file()]


def auto_variant(on_gpu: bool, present: Iterable[str]) -> str:
    """The variant `auto` stands for: `fp16` on a GPU when the folder has it, else `fp32`."""
    return "fp16" if on_gpu and "fp16" in set(present) else "fp32"


def open_engine(
    folder: str | Path,
    variant: str = AUTO,
    *,
    providers: Sequence[str] = DEFAULT_PROVIDERS,
    require_gpu: bool = False,
    **engine_options: Any,
) -> Engine:
    """An `Engine` on the `variant` file of a store folder (checked against its card); `auto` as described above.

    `require_gpu` keeps its meaning: no GPU provider → `GpuUnavailableError` with onnxruntime's reason."""
    folder = Path(folder)
    if variant not in CHOICES:
        raise ValueError(f"unknown variant {variant!r}: expected one of {' | '.join(CHOICES)}")
    if variant != AUTO:
        file = resolve_model(folder, variant).file
        return Engine(file, providers=providers, require_gpu=require_gpu, **engine_options)
    present = present_variants(folder)
    gpu_listed = any(p in GPU_PROVIDERS for p in resolve_providers(providers))
    if gpu_listed and "fp16" in present:
        try:
            return Engine(resolve_model(folder, "fp16").file, providers=providers, require_gpu=True, **engine_options)
        except GpuUnavailableError as error:
            if require_gpu:
                raise
            reasons = error.reasons
        log.warning("variant auto: no GPU provider started, serving %s on CPU", VARIANT_FILES["fp32"])
        engine = Engine(resolve_model(folder, "fp32").file, providers=("cpu",), **engine_options)
        engine.fallback_reasons.update(reasons)
        return engine
    if gpu_listed:
        log.warning(
            "variant auto: %s has no %s, so a GPU runs the FP32 file (export the model with `deepclust export --fp16`)",
            folder,
            VARIANT_FILES["fp16"],
        )
    return Engine(resolve_model(folder, "fp32").file, providers=providers, require_gpu=require_gpu, **engine_options)
