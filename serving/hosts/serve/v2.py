"""The Open Inference Protocol (KServe v2) REST endpoints of the front, the same on both backends.

Endpoints (spec: kserve `docs/predict-api/v2/required_api.md`; errors are `{"error": "<message>"}`):
- `GET /v2/health/live` → 200 `{"live": true}` while the process serves HTTP;
- `GET /v2/health/ready` → 200 `{"ready": true}` once a real prediction has succeeded and the backend is healthy, else
  503 `{"ready": false}` (the same rule as `/ping`);
- `GET /v2` → server metadata; `GET /v2/models/<name>[/versions/<v>]` → model metadata; `…/ready` → model readiness;
- `POST /v2/models/<name>[/versions/<v>]/infer` with exactly one input, either
  - `BYTES`, shape `[N]`: N encoded images (JPEG, PNG, …). In JSON each element is the image's base64 text (a JSON
    string cannot carry raw bytes); with the binary tensor extension (`Inference-Header-Content-Length` header,
    `parameters.binary_data_size` on the input) each element is a 4-byte little-endian length and the raw bytes,
    as Triton clients send them;
  - `UINT8`, shape `[N, H, W, 3]` or `[H, W, 3]`: decoded RGB pixels, row-major (JSON numbers or binary), resized to
    the model's input size exactly as an encoded image would be after decoding.
  Outputs (all by default, or those named in `outputs`), one element per image: `cluster` INT64, `confidence` FP32,
  `label` BYTES (the class name or ""), `error` BYTES ("" or "<code>: <message>"; a failed image has cluster -1 and
  confidence 0, and never fails its neighbours, as in our own API). Answers are JSON.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from typing import Any

import numpy as np
from aiohttp import web

from serving.hosts.serve.plumbing import STATE, FrontError, Item, call_backend, check_model, read_body

OUTPUTS = {"cluster": "INT64", "confidence": "FP32", "label": "BYTES", "error": "BYTES"}
BINARY_HEADER = "Inference-Header-Content-Length"


class V2Error(Exception):
    """A request the protocol refuses: 400 `{"error": message}`."""


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=json.dumps({"error": message}).encode(), content_type="application/json")


def _ok(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(payload).encode(), content_type="application/json")


# ------------------------------------------------------------------------------------------------ parsing
def parse_infer(body: bytes, header_length: str | None) -> tuple[list[Item], list[str], str | None]:
    """An infer request → (images, requested output names, request id); `V2Error` when it is not usable."""
    binary = b""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError as exc:
            raise V2Error(f"{BINARY_HEADER} must be an integer") from exc
        if not 0 <= n <= len(body):
            raise V2Error(f"{BINARY_HEADER} {n} is outside the body of {len(body)} bytes")
        body, binary = body[:n], body[n:]
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise V2Error(f"the request is not valid JSON: {exc}") from exc
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise V2Error('an inference request is a JSON object with an "inputs" list')
    inputs = request["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise V2Error("exactly one input is expected: BYTES [N] encoded images or UINT8 [N, H, W, 3] pixels")
    tensor = inputs[0]
    datatype, shape = tensor.get("datatype"), tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise V2Error("the input's shape must be a list of non-negative integers")
    parameters = tensor.get("parameters") or {}
    raw: bytes | None = None
    if isinstance(parameters, dict) and "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if not isinstance(size, int) or not 0 <= size <= len(binary):
            raise V2Error("binary_data_size does not match the binary data sent")
        raw = binary[:size]
    elif "data" not in tensor:
        raise V2Error('the input has no "data"')
    if datatype == "BYTES":
        items: list[Item] = _bytes_input(shape, raw, tensor.get("data"))
    elif datatype == "UINT8":
        items = _uint8_input(shape, raw, tensor.get("data"))
    else:
        raise V2Error(f"unsupported input datatype {datatype!r}: BYTES (encoded images) or UINT8 (pixels)")
    wanted = request.get("outputs")
    names = list(OUTPUTS)
    if wanted is not None:
        if not isinstance(wanted, list) or not all(isinstance(o, dict) and "name" in o for o in wanted):
            raise V2Error('"outputs" must be a list of {"name": …}')
        names = [o["name"] for o in wanted]
        unknown = [n for n in names if n not in OUTPUTS]
        if unknown:
            raise V2Error(f"unknown outputs {unknown}: this model has {list(OUTPUTS)}")
    request_id = request.get("id")
    return items, names, request_id if isinstance(request_id, str) else None


def _bytes_input(shape: list[int], raw: bytes | None, data: Any) -> list[Item]:
    if len(shape) != 1:
        raise V2Error("a BYTES input has shape [N] (one encoded image per element)")
    if raw is not None:
        items, offset = [], 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise V2Error("truncated BYTES element length")
            (length,) = struct.unpack_from("<I", raw, offset)
            offset += 4
            if offset + length > len(raw):
                raise V2Error("truncated BYTES element")
            items.append(raw[offset : offset + length])
            offset += length
    else:
        flat = _flatten(data)
        items = []
        for n, element in enumerate(flat):
            if not isinstance(element, str):
                raise V2Error(f"BYTES element {n} is not a string (base64 of the encoded image)")
            if element.startswith("data:") and "," in element:
                element = element.split(",", 1)[1]
            try:
                items.append(base64.b64decode(element, validate=True))
            except (binascii.Error, ValueError) as exc:
                raise V2Error(f"BYTES element {n} is not valid base64") from exc
    if len(items) != shape[0]:
        raise V2Error(f"shape {shape} but {len(items)} elements")
    return items


def _uint8_input(shape: list[int], raw: bytes | None, data: Any) -> list[Item]:
    if len(shape) == 3:
        shape = [1, *shape]
    if len(shape) != 4 or shape[3] != 3 or shape[1] < 1 or shape[2] < 1:
        raise V2Error("a UINT8 input has shape [N, H, W, 3] or [H, W, 3] (RGB pixels, row-major)")
    count = int(np.prod(shape))
    if raw is not None:
        if len(raw) != count:
            raise V2Error(f"shape {shape} needs {count} bytes, got {len(raw)}")
        array = np.frombuffer(raw, dtype=np.uint8)
    else:
        try:
            values = np.asarray(_flatten(data), dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as exc:
            raise V2Error("UINT8 data must be integers 0-255") from exc
        if values.size != count:
            raise V2Error(f"shape {shape} needs {count} values, got {values.size}")
        if values.size and (values.min() < 0 or values.max() > 255):
            raise V2Error("UINT8 data must be integers 0-255")
        array = values.astype(np.uint8)
    return list(array.reshape(shape))


def _flatten(data: Any) -> list[Any]:
    """Row-major flattening of nested JSON lists (the spec allows flat or nested tensor data)."""
    if not isinstance(data, list):
        raise V2Error('"data" must be a list')
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            out.append(value)
        else:
            stack.pop()
    return out


def infer_answer(model: str, results: list[dict[str, Any]], names: list[str], request_id: str | None) -> dict:
    """Per-item results (our JSON items) → the v2 response's outputs."""
    columns: dict[str, list[Any]] = {"cluster": [], "confidence": [], "label": [], "error": []}
    for item in results:
        if "error" in item:
            columns["cluster"].append(-1)
            columns["confidence"].append(0.0)
            columns["label"].append("")
            columns["error"].append(f"{item['error']['code']}: {item['error']['message']}")
        else:
            columns["cluster"].append(int(item["cluster"]))
            columns["confidence"].append(float(item["confidence"]))
            columns["label"].append(item.get("label") or "")
            columns["error"].append("")
    answer: dict[str, Any] = {
        "model_name": model,
        "model_version": "1",
        "outputs": [{"name": n, "datatype": OUTPUTS[n], "shape": [len(results)], "data": columns[n]} for n in names],
    }
    if request_id is not None:
        answer["id"] = request_id
    return answer


# ------------------------------------------------------------------------------------------------ handlers
async def live(request: web.Request) -> web.Response:
    return _ok({"live": True})


async def _ready(request: web.Request) -> bool:
    state = request.app[STATE]
    if not state.ready:
        return False
    status, _ = await call_backend(request, state.backend.health())
    return status == 200


async def ready(request: web.Request) -> web.Response:
    is_ready = await _ready(request)
    return _ok({"ready": is_ready}, 200 if is_ready else 503)


async def server_metadata(request: web.Request) -> web.Response:
    return _ok({"name": "deepclust", "version": "0.1.0", "extensions": ["binary_tensor_data"]})


def _model(request: web.Request) -> str | web.Response:
    name = request.match_info["model"]
    try:
        check_model(request, name)
    except FrontError as exc:
        return _error(404, exc.message)
    version = request.match_info.get("version")
    if version not in (None, "1"):
        return _error(404, f"model {name!r} has only version 1")
    return name


async def model_metadata(request: web.Request) -> web.Response:
    name = _model(request)
    if isinstance(name, web.Response):
        return name
    return _ok(
        {
            "name": name,
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [
                {"name": "images", "datatype": "BYTES", "shape": [-1]},
                {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
            ],
            "outputs": [{"name": n, "datatype": d, "shape": [-1]} for n, d in OUTPUTS.items()],
            "parameters": {"inputs": "send exactly one of the inputs", "backend": request.app[STATE].backend.name},
        }
    )


async def model_ready(request: web.Request) -> web.Response:
    name = _model(request)
    if isinstance(name, web.Response):
        return name
    is_ready = await _ready(request)
    return _ok({"name": name, "ready": is_ready}, 200 if is_ready else 503)


async def infer(request: web.Request) -> web.Response:
    name = _model(request)
    if isinstance(name, web.Response):
        return name
    state = request.app[STATE]
    body = await read_body(request)
    try:
        items, names, request_id = parse_infer(body, request.headers.get(BINARY_HEADER))
    except V2Error as exc:
        return _error(400, str(exc))
    status, results = await call_backend(request, state.backend.predict_items(items))
    if status != 200:
        message = results[0]["error"]["message"] if results and "error" in results[0] else "bad request"
        return _error(status, message)
    if any("error" not in r for r in results):
        state.mark_ready()
    return _ok(infer_answer(name, results, names, request_id))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v2", server_metadata)
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_get(prefix, model_metadata)
        app.router.add_get(prefix + "/ready", model_ready)
        app.router.add_post(prefix + "/infer", infer)
