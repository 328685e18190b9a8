"""TorchServe custom handler on the deepclust Engine (KServe-like: initialize / preprocess / inference /
postprocess).

Request forms (docs/design.md §3), one request = one or several images:
- raw body: one image (`curl --data-binary @cat.jpg …`);
- multipart/form-data: several files, each part one image, answered in the order of the parts. TorchServe keys the
  parts by field name, so give each file its own field name (`-F a=@x.jpg -F b=@y.jpg`; `deepclust predict` does);
- JSON `{"images": ["<base64>", …]}` (optionally `"top_k": n`).
Response: ALWAYS a JSON list, one entry per image in request order, even for a single raw image (one rule for every
client): `{"cluster", "confidence", "label"}` (+ `top_k` when asked) or `{"error": {"code", "message"}}`. HTTP 200
whenever the request could be parsed (per-image errors are in the body); HTTP 400 with a one-item error list when
the request itself is unusable (no image, invalid JSON).

TorchServe hands the handler several requests at once (server-side batching). All good images of all requests are
decoded, run through the engine in one batch, and split back: one response per request, a bad image or a bad
request never fails its neighbours.

Configuration comes from the `deepclust serve` parent through the `DEEPCLUST_HANDLER_CONFIG` environment variable
(JSON), so that the archive does not change when only a runtime setting does.

On a GPU: the worker's GPU is TorchServe's `gpu_id` (handed round-robin over the GPUs, so `workers` = 2 x GPUs gives
two workers per GPU); `variant: "auto"` opens the FP16 file on a GPU provider and the FP32 file on CPU
(`serving.core.variants`). The images of a batch are decoded by `decode_threads` threads (Pillow releases the GIL
while decoding and resizing); by default one on CPU, where onnxruntime's threads already take the cores, and
`intra_op_threads` on a GPU provider, where those threads are idle. With several workers per GPU, one worker's
decoding also runs while another's batch is on the GPU.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serving.core.contract import VARIANT_FILES
from serving.core.engine import GPU_PROVIDERS, Engine, assign
from serving.core.model_store import resolve_model
from serving.core.options import OPTION_KEYS, parse_top_k
from serving.core.preprocess import DecodeLimits, ImageError, load_image
from serving.core.results import Assignment, ItemError

log = logging.getLogger("deepclust.handler")
CONFIG_ENV = "DEEPCLUST_HANDLER_CONFIG"


@dataclass
class ParsedRequest:
    """One HTTP request after parsing: its images (bytes or an error each) or a request-level error."""

    items: list[bytes | ItemError] = field(default_factory=list)
    top_k: int = 0
    request_error: ItemError | None = None


class DeepclustHandler:
    """Loaded once per TorchServe worker; `handle` is called with a server-side batch of requests."""

    def __init__(self) -> None:
        self.initialized = False
        self.engine: Engine | None = None
        self.metrics = None
        self.limits = DecodeLimits()
        self.decode_threads = 1
        self._decode_pool: ThreadPoolExecutor | None = None

    # ----------------------------------------------------------------------------------------------
    # initialize
    def initialize(self, context: Any) -> None:
        config = json.loads(os.environ.get(CONFIG_ENV) or "{}")
        model_dir = Path(context.system_properties.get("model_dir"))
        self.limits = DecodeLimits(
            max_bytes=int(config.get("max_bytes", DecodeLimits.max_bytes)),
            max_pixels=int(config.get("max_pixels", DecodeLimits.max_pixels)),
        )
        self.engine = self.open_engine(config, model_dir, context.system_properties.get("gpu_id"))
        self.decode_threads = decode_threads(config, self.engine.provider)
        if self.decode_threads > 1:
            self._decode_pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")
        if config.get("metrics", True):
            from serving.hosts.torchserve.telemetry import ServiceMetrics

            self.metrics = ServiceMetrics.get()
            name = config.get("model_name") or context.model_name
            provider = self.engine.provider.removesuffix("ExecutionProvider").lower()
            self.metrics.set_model(name, self.engine.metadata.method, self.engine.k, self.engine.sha256, provider)
        # WARNING, not INFO: TorchServe copies worker stderr into its own log, which `kubectl logs` shows.
        described = {**self.engine.describe(), "decode_threads": self.decode_threads}
        log.warning("deepclust handler ready on %s: %s", self.engine.provider, json.dumps(described))
        self.initialized = True

    @staticmethod
    def open_engine(config: dict[str, Any], model_dir: Path, gpu_id: Any) -> Engine:
        """The engine of this worker: on the GPU TorchServe gave it (`gpu_id`, None without GPUs → 0), on the file
        the config names, or the variant `auto` picks among the files in the archive. The archive holds the files
        and their card: the same resolver as every host refuses a changed file."""
        options: dict[str, Any] = {
            "providers": tuple(config.get("providers", ("cuda", "cpu"))),
            "intra_op_threads": int(config.get("intra_op_threads", 0)),
            "max_batch": int(config.get("max_batch", 64)),
            "warmup": True,
            "require_gpu": bool(config.get("require_gpu", False)),
            "device_id": int(gpu_id or 0),
            # onnxruntime's intra-op threads sleep between operators unless `intra_op_spin` (as the engine backend's
            # workers): the worker's cores are shared with its decoding, the front and the JVM.
            "spin": bool(config.get("intra_op_spin", False)),
        }
        if config.get("variant") == "auto":
            from serving.core.variants import open_engine

            return open_engine(model_dir, "auto", **options)
        model_file = resolve_model(model_dir / config.get("model_file", VARIANT_FILES["fp32"])).file
        return Engine(model_file, **options)

    # ----------------------------------------------------------------------------------------------
    # preprocess
    def preprocess(
        self, requests: list[dict], body_types: list[str | None] | None = None
    ) -> tuple[list[ParsedRequest], np.ndarray, list[tuple[int, int]]]:
        """Parse every request and decode every image; returns the parsed requests, the stacked good images
        and,
        for each good image, its (request index, item index). `body_types`: the Content-Type of each body."""
        body_types = body_types or [None] * len(requests)
        parsed = [self.parse_request(request, kind) for request, kind in zip(requests, body_types, strict=True)]
        size = self.engine.input_size
        todo = [(r, i) for r, request in enumerate(parsed) for i, item in enumerate(request.items)]
        todo = [(r, i) for r, i in todo if not isinstance(parsed[r].items[i], ItemError)]
        decoded = self._decode_all([parsed[r].items[i] for r, i in todo], size)
        arrays: list[np.ndarray] = []
        where: list[tuple[int, int]] = []
        for (r, i), result in zip(todo, decoded, strict=True):
            if isinstance(result, ImageError):
                parsed[r].items[i] = ItemError.of(result.code, result.message)
            else:
                arrays.append(result)
                where.append((r, i))
        batch = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
        return parsed, batch, where

    def _decode_all(self, items: list[bytes], size: int) -> list[np.ndarray | ImageError]:
        """Decode + resize every image, on the decode threads when there are several; results in input order."""

        def decode(data: bytes) -> np.ndarray | ImageError:
            try:
                return load_image(data, size, self.limits)
            except ImageError as exc:
                return exc

        if self._decode_pool is None or len(items) < 2:
            return [decode(item) for item in items]
        return list(self._decode_pool.map(decode, items))

    def parse_request(self, request: dict, body_type: str | None = None) -> ParsedRequest:
        parsed = ParsedRequest()
        try:
            parsed.top_k = parse_top_k(request.get("top_k"))
            body = request.get("body") if "body" in request else request.get("data")
            if body_type and body_type.startswith("application/json") and not isinstance(body, dict | list):
                raise ValueError("the body is declared as JSON but is not valid JSON")
            if isinstance(body, dict):  # JSON body (TorchServe already decoded application/json)
                self._parse_json(body, parsed)
            elif isinstance(body, list):
                raise ValueError('a JSON body must be an object {"images": [...]}, not a list')
            elif body is not None and len(request) - len(OPTION_KEYS & request.keys()) == 1:
                parsed.items.append(_as_bytes(body))  # raw body: one image
            else:  # multipart: every non-option field is one image, in order
                for key, value in request.items():
                    if key in OPTION_KEYS:
                        continue
                    if isinstance(value, bytes | bytearray):
                        parsed.items.append(bytes(value))
                    else:
                        parsed.items.append(ItemError.of("bad_request", f"form field '{key}' is not an image file"))
            if not parsed.items:
                raise ValueError("the request has no image")
        except ValueError as exc:
            parsed.items = []
            parsed.request_error = ItemError.of("bad_request", str(exc))
        return parsed

    @staticmethod
    def _parse_json(body: dict, parsed: ParsedRequest) -> None:
        images = body.get("images")
        if not isinstance(images, list):
            raise ValueError('a JSON request must be {"images": ["<base64>", ...]}')
        if "top_k" in body:
            parsed.top_k = parse_top_k(body["top_k"])
        for n, encoded in enumerate(images):
            if not isinstance(encoded, str):
                parsed.items.append(ItemError.of("bad_request", f"images[{n}] is not a base64 string"))
                continue
            if encoded.startswith("data:") and "," in encoded:  # tolerate data URLs
                encoded = encoded.split(",", 1)[1]
            try:
                parsed.items.append(base64.b64decode(encoded, validate=True))
            except (binascii.Error, ValueError):
                parsed.items.append(ItemError.of("bad_request", f"images[{n}] is not valid base64"))

    # -----------------------------------------------------------------------------------------------
    # inference
    def inference(self, batch: np.ndarray, top_k: int = 0) -> tuple[list[Assignment], float]:
        started = time.perf_counter()
        output = self.engine.run(batch)
        seconds = time.perf_counter() - started
        return assign(output, self.engine.metadata.class_names, top_k=top_k), seconds

    # ---------------------------------------------------------------------------------------------
    # postprocess
    def postprocess(
        self, parsed: list[ParsedRequest], results: list[Assignment], where: list[tuple[int, int]]
    ) -> list[list[dict]]:
        answers: list[list[Assignment | ItemError | bytes]] = [list(p.items) for p in parsed]
        for (r, i), result in zip(where, results, strict=True):
            if parsed[r].top_k:
                result.top_k = result.top_k[: parsed[r].top_k] if result.top_k else None
            else:
                result.top_k = None
            answers[r][i] = result
        out: list[list[dict]] = []
        for p, items in zip(parsed, answers, strict=True):
            if p.request_error is not None:
                out.append([p.request_error.model_dump()])
                continue
            out.append([_public(item) for item in items])
        return out

    # --------------------------------------------------------------------------------------------------
    # handle
    def handle(self, data: list[dict], context: Any) -> list[list[dict]]:
        parsed, batch, where = self.preprocess(data, [_body_type(context, idx) for idx in range(len(data))])
        top_k = max((p.top_k for p in parsed), default=0)
        results, inference_seconds = self.inference(batch, top_k) if len(batch) else ([], 0.0)
        responses = self.postprocess(parsed, results, where)
        for idx, parsed_request in enumerate(parsed):
            context.set_response_content_type(idx, "application/json")
            if parsed_request.request_error is not None:
                context.set_response_status(400, "Bad Request", idx=idx)
        self._observe(parsed, responses, len(batch), inference_seconds)
        return responses

    def _observe(self, parsed, responses, batch_size, inference_seconds) -> None:
        """Per-image and per-batch metrics. Requests and their end-to-end latency are counted by the HTTP front
        (`front.py`), which also sees TorchServe's queueing and the requests refused before this handler."""
        if self.metrics is None:
            return
        answered = []
        for p, response in zip(parsed, responses, strict=True):
            if p.request_error is not None:  # the request's one error item is counted as a bad request
                self.metrics.images.labels(outcome="bad_request").inc()
            else:
                answered.append(response)
        self.metrics.observe_batch(answered, batch_size, inference_seconds)


def decode_threads(config: dict[str, Any], provider: str) -> int:
    """Threads decoding one batch: `decode_threads` when set (> 0); otherwise the worker's onnxruntime thread count
    on a GPU provider (those CPU threads are idle there) and 1 on CPU (onnxruntime's threads take the cores)."""
    asked = int(config.get("decode_threads", 0) or 0)
    if asked > 0:
        return asked
    if provider in GPU_PROVIDERS:
        return max(1, int(config.get("intra_op_threads", 0) or 0) or 1)
    return 1


def _body_type(context: Any, idx: int) -> str | None:
    """Content-Type of the request's body part, as TorchServe reports it (None if unknown)."""
    try:
        entry = context.get_request_header(idx, "body")
    except Exception:
        return None
    if isinstance(entry, dict):
        entry = entry.get("content-type")
    return entry.lower() if isinstance(entry, str) else None


def _public(item: Assignment | ItemError) -> dict:
    if isinstance(item, Assignment):
        return item.public()
    return item.model_dump()


def _as_bytes(body: Any) -> bytes:
    if isinstance(body, bytes | bytearray):
        return bytes(body)
    if isinstance(body, str):  # a text/* body that TorchServe decoded: cannot be an image
        raise ValueError("the body is text, not an image (send image bytes, multipart files or JSON)")
    raise ValueError(f"unsupported body of type {type(body).__name__}")


_service = DeepclustHandler()


def handle(data: list[dict] | None, context: Any) -> list[list[dict]] | None:
    """TorchServe entry point (module-level function handler)."""
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
