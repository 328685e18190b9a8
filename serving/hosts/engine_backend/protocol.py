"""The messages between the front and an engine worker process: JSON plus raw bytes, no pickle.

Transport: a private socket pair (inherited by the worker, nothing listens), framed by
`multiprocessing.connection.Connection.send_bytes/recv_bytes` (a length prefix per message).

- job (front → worker): `[4-byte header length][JSON header][payload]`; the header lists the batch's requests, each
  with `top_k` and its items as `[kind, length, shape]`: `"b"` encoded image bytes, `"a"` uint8 pixels of `shape`,
  `"e"` a per-item `bad_request` whose message is the item's bytes (UTF-8); the payload is every item's bytes in order.
- answer (worker → front): JSON `{"results": [[item, …] per request]}` (items as in our API: `{"cluster", …}` or
  `{"error": {…}}`), `{"failed": "<reason>"}` when the batch raised (500, the worker lives on), `{"ready": true, …}`
  once after the engine is loaded, or `{"fatal": "<reason>"}` when the worker cannot start (not restarted).
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

Item = bytes | np.ndarray | str  # encoded image | decoded pixels | message of a per-item bad_request


def encode_job(requests: list[tuple[list[Item], int]]) -> bytes:
    """[(items, top_k) per request] → one job message."""
    header: list[dict[str, Any]] = []
    payload: list[bytes] = []
    for items, top_k in requests:
        entries = []
        for item in items:
            if isinstance(item, np.ndarray):
                data = np.ascontiguousarray(item, dtype=np.uint8).tobytes()
                entries.append(["a", len(data), list(item.shape)])
            elif isinstance(item, str):
                data = item.encode()
                entries.append(["e", len(data), None])
            else:
                data = bytes(item)
                entries.append(["b", len(data), None])
            payload.append(data)
        header.append({"top_k": top_k, "items": entries})
    head = json.dumps(header).encode()
    return struct.pack("<I", len(head)) + head + b"".join(payload)


def decode_job(message: bytes) -> list[tuple[list[Item], int]]:
    (length,) = struct.unpack_from("<I", message, 0)
    header = json.loads(message[4 : 4 + length])
    offset = 4 + length
    requests: list[tuple[list[Item], int]] = []
    for request in header:
        items: list[Item] = []
        for kind, size, shape in request["items"]:
            data = message[offset : offset + size]
            offset += size
            if kind == "a":
                items.append(np.frombuffer(data, dtype=np.uint8).reshape(shape))
            elif kind == "e":
                items.append(data.decode())
            else:
                items.append(data)
        requests.append((items, int(request["top_k"])))
    return requests
