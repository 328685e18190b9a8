"""A small HTTP client for the service (`deepclust predict`, tests, benchmarks).

Sends several images as one multipart request (each file its own field name, so that TorchServe keeps them all and
in order) or one image as the raw body, with TCP_NODELAY (Nagle + delayed ACK cost ≈ 40 ms per request
on loopback otherwise) and the bearer token when token authorization is on.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from serving.core.results import Assignment, ItemError

_RESULTS = TypeAdapter(list[Assignment | ItemError])


class _NoDelayConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class ServiceError(RuntimeError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


class Client:
    """Keeps one keep-alive connection; not thread-safe (use one client per thread)."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8080",
        model: str = "cifar10-lite0",
        *,
        token: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parsed.scheme != "http":
            raise ValueError("only http:// URLs are supported by this client")
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.model = model
        self.token = token
        self.timeout = timeout
        self._conn: _NoDelayConnection | None = None

    def _connection(self) -> _NoDelayConnection:
        if self._conn is None:
            self._conn = _NoDelayConnection(self.host, self.port, timeout=self.timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def post(self, body: bytes, content_type: str, path: str | None = None) -> tuple[int, Any]:
        """POST raw bytes; returns (status, parsed JSON or text). Retries once on a dropped keep-alive; after any
        other failure (a timeout) the connection is closed, so the next call starts clean."""
        headers = {"Content-Type": content_type, "Content-Length": str(len(body))}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        target = path or f"/predictions/{self.model}"
        for attempt in range(2):
            conn = self._connection()
            try:
                conn.request("POST", target, body=body, headers=headers)
                response = conn.getresponse()
                text = response.read().decode("utf-8", "replace")
                break
            except (ConnectionError, http.client.BadStatusLine, http.client.RemoteDisconnected):
                self.close()
                if attempt:
                    raise
            except BaseException:
                self.close()  # half a request sent or half an answer read: this connection cannot be reused
                raise
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text

    def predict_bytes(self, images: Sequence[bytes]) -> list[Assignment | ItemError]:
        """One image → raw body; several → one multipart request. Result: one entry per image, in order."""
        if len(images) == 1:
            status, payload = self.post(images[0], "application/octet-stream")
        else:
            body, content_type = multipart(images)
            status, payload = self.post(body, content_type)
        if status != 200 or not isinstance(payload, list):
            raise ServiceError(status, json.dumps(payload) if not isinstance(payload, str) else payload)
        return _RESULTS.validate_python(payload)

    def predict_files(self, paths: Sequence[str | Path]) -> list[Assignment | ItemError]:
        return self.predict_bytes([Path(p).read_bytes() for p in paths])


def multipart(images: Sequence[bytes], names: Sequence[str] | None = None) -> tuple[bytes, str]:
    """multipart/form-data with one distinctly named file field per image (`image0`, `image1`, …)."""
    boundary = uuid.uuid4().hex
    parts = []
    for i, data in enumerate(images):
        name = f"image{i:05d}"
        filename = names[i] if names else name
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"
