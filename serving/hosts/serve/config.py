"""The settings of `deepclust serve`, shared by both backends (`torchserve`, `engine`), and the checks made before
any worker starts (the model's sha256 against its card; a GPU when `require_gpu` is set).

Loadable from YAML (`deepclust serve -c serve.yaml`, keys optionally under `serve:`), overridable from the command
line. Security default: every address is loopback; `token_auth: auto` turns client token authorization on as soon as
the front or the metrics endpoint is bound elsewhere.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.core.contract import ModelCard, Variant
from serving.core.model_store import (
    ModelStoreError,
    ResolvedModel,
    default_model_name,
    default_model_store,
    model_folder,
    resolve_model,
    variant_file,
)

log = logging.getLogger("deepclust.serve")
BACKEND_ENV = "DEEPCLUST_SERVE_BACKEND"
"""The backend when neither `--backend` nor the settings file chooses one (the container image sets it)."""


def default_cache_dir() -> Path:
    env = os.environ.get("DEEPCLUST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "deepclust"


class ServeConfig(BaseModel):
    """Everything `deepclust serve` needs; loadable from YAML, overridable from the command line."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    backend: Literal["torchserve", "engine"] = Field(
        default_factory=lambda: os.environ.get(BACKEND_ENV, "torchserve"),  # type: ignore[arg-type]
        validate_default=True,
        description="torchserve (Java frontend + Python workers) | engine (our own worker processes, no JVM)",
    )
    model: str = Field(
        "",
        description="folder name in the model store (also the URL's model name); empty: the store's default, the "
        "most accurate model whose measured service reaches 100 img/s (model_store/throughput.json)",
    )
    model_store: Path = Field(default_factory=default_model_store)
    variant: Literal["auto"] | Variant = Field(
        "fp32",
        description="fp32 | int8 | fp16 | auto (FP16 on a GPU provider, FP32 on CPU; INT8 only when asked; "
        "serving.core.variants)",
    )
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    management: Literal["off", "loopback"] = "off"
    management_port: int = Field(8081, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(8082, ge=1, le=65535, description="deepclust Prometheus metrics (histograms)")
    torchserve_metrics_port: int = Field(8083, ge=1, le=65535, description="TorchServe's own metrics API")
    token_auth: Literal["auto", "on", "off"] = "auto"  # noqa: S105 - a mode, not a secret
    token_expiration_min: int = Field(60 * 24 * 30, ge=1)
    workers: int = Field(1, ge=1, le=16, description="worker processes running the engine (either backend)")
    batch_size: int = Field(16, ge=1, le=1024, description="server-side batch (requests), either backend")
    max_batch_delay_ms: int = Field(10, ge=0, le=10_000)
    response_timeout_s: int = Field(120, ge=1)
    providers: list[str] = Field(default_factory=lambda: ["cuda", "cpu"], description="TensorRT only if configured")
    require_gpu: bool = Field(False, description="refuse to start when no GPU provider runs (onnxruntime's reason)")
    intra_op_threads: int = Field(0, ge=0, description="onnxruntime threads per worker (0 = all cores)")
    intra_op_spin: bool = Field(
        False,
        description="either backend: onnxruntime's intra-op threads busy-wait between operators. Off by default: "
        "the cores are shared with the front, the decoding and other processes (measured: benchmarks/serve_load.py)",
    )
    max_batch: int = Field(64, ge=1, description="largest engine batch (images); bigger ones are split")
    max_bytes: int = Field(20 * (1 << 20), ge=1)
    max_pixels: int = Field(40_000_000, ge=1)
    queue_size: int = Field(1000, ge=1, description="requests waiting for a worker before 503 (engine backend)")
    max_request_bytes: int = Field(
        100 * (1 << 20), ge=1, description="largest request body the HTTP front accepts (413 above)"
    )
    max_header_bytes: int = Field(64 * 1024, ge=1024, le=1 << 20, description="largest request head (431 above)")
    read_timeout_s: float = Field(30, gt=0, description="time to receive a request head and its body (408)")
    keepalive_timeout_s: float = Field(75, gt=0, description="idle time before a client connection is closed")
    backend_port: int = Field(
        0, ge=0, le=65535, description="TorchServe's internal inference port on 127.0.0.1 (0 = a free one)"
    )
    cache_dir: Path = Field(default_factory=default_cache_dir)
    log_dir: Path | None = None
    startup_timeout_s: float = Field(180, gt=0)
    java: str = "java"
    jvm_heap: str = "512m"

    @model_validator(mode="after")
    def _default_model(self) -> ServeConfig:
        if not self.model:
            self.model = default_model_name(self.model_store)
        return self

    @model_validator(mode="after")
    def _distinct_ports(self) -> ServeConfig:
        ports = [self.port, self.metrics_port]
        if self.backend == "torchserve":
            ports.append(self.torchserve_metrics_port)
        if self.backend_port:
            ports.append(self.backend_port)
        if self.management == "loopback":
            ports.append(self.management_port)
        if len(set(ports)) != len(ports):
            raise ValueError(f"the inference, management and metrics ports must differ: {ports}")
        return self

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> ServeConfig:
        """YAML file (optional) + overrides (None values ignored)."""
        data: dict[str, Any] = {}
        if path:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: expected a mapping of serve settings")
            data.update(loaded.get("serve", loaded))
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)

    # ----------------------------------------------------------------------------------------------- derived
    @property
    def model_dir(self) -> Path:
        return model_folder(self.model, self.model_store)

    @property
    def model_name(self) -> str:
        return self.model_dir.name

    @property
    def model_file(self) -> Path:
        """The file of `variant`; for `auto`, the FP32 file (what `auto` runs on CPU, and always required)."""
        return variant_file(self.model_dir, "fp32" if self.variant == "auto" else self.variant)

    @property
    def model_variants(self) -> list[str]:
        """The variants a worker may open: `variant`, or for `auto` FP32 and FP16 when the folder has its file
        (`auto` never picks INT8)."""
        if self.variant != "auto":
            return [self.variant]
        from serving.core.variants import present_variants

        return ["fp32"] + (["fp16"] if "fp16" in present_variants(self.model_dir) else [])

    @property
    def model_files(self) -> list[Path]:
        """The files of `model_variants` (the TorchServe archive holds them all)."""
        return [variant_file(self.model_dir, v) for v in self.model_variants]

    @property
    def auth_enabled(self) -> bool:
        if self.token_auth != "auto":  # noqa: S105 - a mode, not a secret
            return self.token_auth == "on"  # noqa: S105
        return not (_is_loopback(self.host) and _is_loopback(self.metrics_host))

    @property
    def base_url(self) -> str:
        # A wildcard bind is reached on its own family's loopback: asyncio binds "::" IPv6-only (IPV6_V6ONLY), so
        # 127.0.0.1 would never answer and `--host ::` never got ready.
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)  # noqa: S104 - not a bind
        return f"http://{_url_host(host)}:{self.port}"

    def handler_config(self) -> dict[str, Any]:
        return {
            "model_file": self.model_file.name,
            "variant": self.variant,
            "model_name": self.model_name,
            "providers": self.providers,
            "require_gpu": self.require_gpu,
            "intra_op_threads": self.intra_op_threads,
            "intra_op_spin": self.intra_op_spin,
            "max_batch": self.max_batch,
            "max_bytes": self.max_bytes,
            "max_pixels": self.max_pixels,
            "metrics": True,
        }


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def verify_model(config: ServeConfig) -> ModelCard:
    """Refuse to serve a model that is missing or whose file differs from its card (`ModelStoreError`; exit 2).
    With `variant: auto`, every file a worker may open (`model_files`) is checked."""
    card: ModelCard | None = None
    for variant in config.model_variants:
        resolved: ResolvedModel = resolve_model(config.model_dir, variant)
        if resolved.card is None or resolved.file != variant_file(config.model_dir, variant):
            raise ModelStoreError(f"deepclust serve serves a model store folder, not a single file: {config.model}")
        card = resolved.card
    assert card is not None
    return card


def check_gpu(config: ServeConfig) -> str:
    """With `require_gpu`, open the model on the configured providers here, before the JVM starts: no GPU provider →
    `GpuUnavailableError` with onnxruntime's reason, so `deepclust serve` exits at once instead of a backend
    retrying a worker that can never load. The model is opened the way the workers open it
    (`serving.core.variants.open_engine`: the same file for `auto`, checked against the card). The probe session is
    released before the workers start."""
    from serving.core.variants import open_engine

    engine = open_engine(config.model_dir, config.variant, providers=config.providers, require_gpu=True, warmup=False)
    provider, file = engine.provider, engine.model_path.name
    del engine
    log.warning("require_gpu: %s (variant %s) runs %s", file, config.variant, provider)
    return provider
