"""Our prediction request forms (docs/design.md §3) → the images of one request, for the engine backend.

The same rules as the TorchServe handler (`serving/hosts/torchserve/handler.py`; the API test suite runs the same
requests against both backends and compares):
- a JSON body (`Content-Type: application/json`): `{"images": ["<base64>", …], "top_k": n}`; a string that is not
  base64 is a per-item `bad_request`; anything else (invalid JSON, a list, no `images` list) is a request error;
- a multipart/form-data body: every file part is one image, in the order of the parts; a text field named `top_k`
  is the option, any other text field is a per-item `bad_request`; a body with no part, a part without a name or a
  missing boundary is a request error. Parsed with python-multipart (the parser Starlette uses), not by hand;
- any other body (`curl --data-binary`: form-encoded, untyped, `image/*`, …): the raw bytes are one image;
- `top_k` (JSON member or form field) goes through the one parser both backends use, `serving.core.options.parse_top_k`
  (a boolean is refused: `true` is not a count).
A request error becomes a 400 with a one-item error list; per-item problems are decided by the decoder in the worker.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header

from serving.core.options import OPTION_KEYS, parse_top_k

# python-multipart logs every malformed body (a client's fault, answered 400) at WARNING: a hostile client could
# flood the log with it.
logging.getLogger("python_multipart.multipart").setLevel(logging.ERROR)


@dataclass
class ParsedRequest:
    """The images of one request (bytes, or an error message for a per-item `bad_request`), or a request error."""

    items: list[bytes | str] = field(default_factory=list)  # str = the message of a per-item bad_request
    top_k: int = 0
    request_error: str | None = None


def parse_request(body: bytes, content_type: str | None) -> ParsedRequest:
    """One HTTP request body → its images; never raises (a problem is a request error or a per-item error)."""
    parsed = ParsedRequest()
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    try:
        if kind == "application/json":
            _parse_json(body, parsed)
        elif kind == "multipart/form-data":
            _parse_multipart(body, content_type or "", parsed)
        else:
            parsed.items.append(body)  # raw body: one image
        if not parsed.items:
            raise ValueError("the request has no image")
    except ValueError as exc:
        parsed.items = []
        parsed.request_error = str(exc)
    return parsed


def _parse_json(body: bytes, parsed: ParsedRequest) -> None:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("the body is declared as JSON but is not valid JSON") from exc
    if isinstance(payload, list):
        raise ValueError('a JSON body must be an object {"images": [...]}, not a list')
    if not isinstance(payload, dict) or not isinstance(payload.get("images"), list):
        raise ValueError('a JSON request must be {"images": ["<base64>", ...]}')
    if "top_k" in payload:
        parsed.top_k = parse_top_k(payload["top_k"])
    for n, encoded in enumerate(payload["images"]):
        if not isinstance(encoded, str):
            parsed.items.append(f"images[{n}] is not a base64 string")
            continue
        if encoded.startswith("data:") and "," in encoded:  # tolerate data URLs
            encoded = encoded.split(",", 1)[1]
        try:
            parsed.items.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            parsed.items.append(f"images[{n}] is not valid base64")


def _parse_multipart(body: bytes, content_type: str, parsed: ParsedRequest) -> None:
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ValueError("multipart/form-data without a boundary")
    parts: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    header: dict[str, bytes] = {"field": b"", "value": b""}

    def on_part_begin() -> None:
        current.clear()
        current.update(headers={}, data=[])

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] += data[start:end]

    def on_header_end() -> None:
        current["headers"][header["field"].lower()] = header["value"]
        header["field"], header["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        current["data"].append(data[start:end])

    def on_part_end() -> None:
        parts.append(dict(current))

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise ValueError(f"malformed multipart/form-data body ({exc})") from exc
    if not parts:
        raise ValueError("malformed multipart/form-data body (no part)")
    for part in parts:
        disposition = part["headers"].get(b"content-disposition", b"")
        _, options = parse_options_header(disposition)
        name = options.get(b"name")
        if not name:
            raise ValueError("malformed multipart/form-data body (a part without a name)")
        data = b"".join(part["data"])
        key = name.decode("utf-8", "replace")
        is_file = b"filename" in options
        if key in OPTION_KEYS and not is_file:
            parsed.top_k = parse_top_k(data)
        elif is_file or not part["headers"].get(b"content-type", b"text/plain").startswith(b"text/"):
            parsed.items.append(data)
        else:
            parsed.items.append(f"form field '{key}' is not an image file")
