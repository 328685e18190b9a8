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
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serving.core.contract import VARIANT_FILES
from serving.core.engine import Engine, assign
from serving.core.model_store import resolve_model
from serving.core.preprocess import DecodeLimits, ImageError, load_image
from serving.core.results import Assignment, ItemError

log = logging.getLogger("deepclust.handler")
CONFIG_ENV = "DEEPCLUST_HANDLER_CONFIG"
OPTION_KEYS = {"top_k"}  # query parameters / form fields that are options, not images
MAX_TOP_K = 20


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

    # ----------------------------------------------------------------------------------------------
    # initialize
    def initialize(self, context: Any) -> None:
        config = json.loads(os.environ.get(CONFIG_ENV) or "{}")
        model_dir = Path(context.system_properties.get("model_dir"))
        # The archive holds the model file and its card: the same resolver as every host refuses a changed file.
        model_file = resolve_model(model_dir / config.get("model_file", VARIANT_FILES["fp32"])).file
        self.limits = DecodeLimits(
            max_bytes=int(config.get("max_bytes", DecodeLimits.max_bytes)),
            max_pixels=int(config.get("max_pixels", DecodeLimits.max_pixels)),
        )
        self.engine = Engine(
            model_file,
            providers=tuple(config.get("providers", ("cuda", "cpu"))),
            intra_op_threads=int(config.get("intra_op_threads", 0)),
            max_batch=int(config.get("max_batch", 64)),
            warmup=True,
            require_gpu=bool(config.get("require_gpu", False)),
            device_id=int(context.system_properties.get("gpu_id") or 0),
        )
        if config.get("metrics", True):
            from serving.hosts.torchserve.telemetry import ServiceMetrics

            self.metrics = ServiceMetrics.get()
            name = config.get("model_name") or context.model_name
            provider = self.engine.provider.removesuffix("ExecutionProvider").lower()
            self.metrics.set_model(name, self.engine.metadata.method, self.engine.k, self.engine.sha256, provider)
        # WARNING, not INFO: TorchServe copies worker stderr into its own log, which `kubectl logs` shows.
        log.warning("deepclust handler ready on %s: %s", self.engine.provider, json.dumps(self.engine.describe()))
        self.initialized = True

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
        arrays: list[np.ndarray] = []
        where: list[tuple[int, int]] = []
        for r, request in enumerate(parsed):
            for i, item in enumerate(request.items):
                if isinstance(item, ItemError):
                    continue
                try:
                    arrays.append(load_image(item, size, self.limits))
                    where.append((r, i))
                except ImageError as exc:
                    request.items[i] = ItemError.of(exc.code, exc.message)
        batch = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
        return parsed, batch, where

    def parse_request(self, request: dict, body_type: str | None = None) -> ParsedRequest:
        parsed = ParsedRequest()
        try:
            parsed.top_k = _parse_top_k(request.get("top_k"))
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
            parsed.top_k = _parse_top_k(body["top_k"])
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
        m = self.metrics
        if m is None:
            return
        if batch_size:
            m.inference_duration.observe(inference_seconds)
            m.batch_size.observe(batch_size)
        for p, response in zip(parsed, responses, strict=True):
            if p.request_error is not None:
                m.images.labels(outcome="bad_request").inc()
                continue
            for item in response:
                if "error" in item:
                    m.images.labels(outcome=item["error"]["code"]).inc()
                else:
                    m.images.labels(outcome="ok").inc()
                    m.cluster_assignments.labels(cluster=str(item["cluster"])).inc()
                    m.confidence.observe(item["confidence"])


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


def _parse_top_k(value: Any) -> int:
    if value is None or value == "":
        return 0
    if isinstance(value, bytes | bytearray):
        value = value.decode("utf-8", "replace")
    try:
        top_k = int(value)
    except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: JSON `1e999`/`Infinity`
        raise ValueError(f"top_k must be an integer, got {value!r}") from exc
    if not 0 <= top_k <= MAX_TOP_K:
        raise ValueError(f"top_k must be between 0 and {MAX_TOP_K}")
    return top_k


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
