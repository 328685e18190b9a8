"""The TorchServe backend of the front (`serving.hosts.serve.front`): forwards to TorchServe's internal inference
port with aiohttp's client (keep-alive pool, TCP_NODELAY). No HTTP parsing of our own.

Why a front at all: `curl --data-binary @cat.jpg URL` sends `Content-Type: application/x-www-form-urlencoded`, and
TorchServe 0.12's Netty frontend parses such a body as a form and answers 500 (`ErrorDataDecoderException: Bad end
of line`) before our handler sees the bytes; no TorchServe setting changes that. We never accept forms, so a form or
untyped prediction upload is forwarded as `application/octet-stream`, and the raw body reaches the handler as one
image. The front is also where the end-to-end latency is measured, where the limits are enforced before Netty reads
a byte, and the only route to TorchServe (only `/ping` and `/predictions/<model>` are forwarded).

Authorization: TorchServe always runs with token authorization (it is the only lock on its gRPC management service,
see server.py). The front checks the client's token itself when client authorization is on, and always sends
TorchServe's inference key upstream, so TorchServe's key never has to reach a client when authorization is off.

Two TorchServe answers that blame the wrong party are rewritten: 400 `InvalidKeyException` → 401 (our JSON error),
500 `ErrorDataDecoderException` (Netty's multipart decoder failed on a malformed client body) → 400 with a one-item
error list, as the handler answers an unusable request.

A worker that dies drops requests silently (TorchServe 0.12, `WorkerThread.run`): the jobs its thread had taken from the
queue while it waited `maxBatchDelay` for a fuller batch are cleared without an answer, so their clients would wait for
the front's `backend_timeout_s` (130 s by default) and get a 504. The jobs of a batch already sent to the worker get
TorchServe's own "Worker died." (500, or 507 after a SIGKILL; rewritten to 503, see `rewrite_error`). So the backend
watches the worker processes (`workers`, polled every `WATCH_INTERVAL_S`); when one disappears it sends a probe
prediction, which TorchServe queues behind every request already forwarded. Once the probe is answered (by the
replacement worker, or another one), every request forwarded before the death that is still unanswered `LOST_GRACE_S`
later was dropped: it is answered 503 with `Retry-After`. With several workers, a long batch another worker was still
computing after that grace is answered 503 as well: predictions are safe to send again, a 130 s wait is not.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web

from serving.hosts.serve.front import BackendUnavailable, Item, error_response, warmup_image
from serving.hosts.serve.plumbing import RETRY_AFTER, RequestLost

log = logging.getLogger("deepclust.front")

FORM = "application/x-www-form-urlencoded"
OCTET_STREAM = "application/octet-stream"
# Request headers not forwarded: hop-by-hop ones, those aiohttp's client sets itself, and the client's token.
DROPPED = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
    "content-length",
    "host",
    "authorization",
}
RELAYED = {"content-type", "x-request-id", "cache-control"}  # response headers passed back to the client
WATCH_INTERVAL_S = 1.0  # how often the worker processes are listed (each listing reads /proc of every process)
PROBE_RETRY_S = 0.25  # between probes while the replacement worker starts
LOST_GRACE_S = 1.0  # after the probe's answer: the answers of the probe's own batch arrive within it
PROBE_DEADLINE_S = 120.0  # probes are retried (a replacement worker loads the model first) for at most this long


class TorchServeBackend:
    """The front's backend for `--backend torchserve`."""

    name = "torchserve"

    def __init__(
        self,
        port: int,
        model_name: str,
        token: Callable[[], str | None],
        host: str = "127.0.0.1",
        workers: Callable[[], list[int]] | None = None,
    ) -> None:
        self.base = f"http://{host}:{port}"
        self.model_name = model_name
        self.token = token  # TorchServe's inference key (read lazily from the key file it writes)
        self.workers = workers  # the worker processes' pids (None: not watched)
        self.session: aiohttp.ClientSession | None = None
        # One future per request in flight to TorchServe; set when the request is known to be dropped.
        self._in_flight: set[asyncio.Future[None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        # No total timeout here: the front bounds each call by `backend_timeout_s` (504).
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=None, connect=5),
            auto_decompress=False,
        )
        if self.workers is not None:
            self._spawn(self._watch_workers())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()
            self.session = None

    def _spawn(self, work) -> None:  # noqa: ANN001 - a coroutine
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch_workers(self) -> None:
        """Poll the worker processes; a pid that disappears starts `_answer_dropped` for the requests in flight."""
        assert self.workers is not None
        known: set[int] = set()
        while True:
            try:
                current = set(await asyncio.to_thread(self.workers))
            except Exception:  # never let the watch end: log and look again
                log.exception("deepclust front: listing the TorchServe workers failed")
                current = known
            died = known - current
            if died and self._in_flight:
                log.warning("deepclust front: TorchServe worker %s died with %d requests in flight", sorted(died),
                            len(self._in_flight))  # fmt: skip
                self._spawn(self._answer_dropped(set(self._in_flight)))
            known = current
            await asyncio.sleep(WATCH_INTERVAL_S)

    async def _answer_dropped(self, caught: set[asyncio.Future[None]]) -> None:
        """Probe until TorchServe answers a prediction queued after `caught`; then those still unanswered were
        dropped (FIFO queue): fail them with `RequestLost`."""
        deadline = time.monotonic() + PROBE_DEADLINE_S
        probe = warmup_image()
        while time.monotonic() < deadline and any(not f.done() for f in caught):
            headers = {"Content-Type": "image/png", **self._auth()}
            try:
                status, _, _ = await self._request("POST", f"/predictions/{self.model_name}", probe, headers)
            except BackendUnavailable:
                status = 0
            if status == 200:
                break
            await asyncio.sleep(PROBE_RETRY_S)
        await asyncio.sleep(LOST_GRACE_S)
        dropped = [f for f in caught if not f.done()]
        for future in dropped:
            future.set_result(None)
        if dropped:
            log.warning("deepclust front: %d requests dropped by the dead worker answered 503", len(dropped))

    def _auth(self) -> dict[str, str]:
        key = self.token()
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def _send(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, Any, bytes]:
        """One request to TorchServe → (status, headers, body). A connection dropped before the answer is retried
        once (a pooled connection TorchServe had closed); unreachable → `BackendUnavailable` (502); dropped by a
        dead worker → `RequestLost` (503)."""
        dropped: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        request = asyncio.ensure_future(self._request(method, path, body, headers))
        self._in_flight.add(dropped)
        try:
            await asyncio.wait((request, dropped), return_when=asyncio.FIRST_COMPLETED)
            if request.done():
                return request.result()
            raise RequestLost(
                "the TorchServe worker died while this request waited for a batch, and TorchServe dropped it: "
                "send it again"
            )
        finally:
            self._in_flight.discard(dropped)
            if not request.done():
                request.cancel()

    async def _request(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, Any, bytes]:
        assert self.session is not None
        for attempt in range(2):
            try:
                async with self.session.request(method, self.base + path, data=body, headers=headers) as answer:
                    return answer.status, answer.headers, await answer.read()
            except aiohttp.ServerDisconnectedError as exc:
                if attempt:
                    raise BackendUnavailable(f"TorchServe dropped the connection: {exc!r}") from exc
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                raise BackendUnavailable(f"TorchServe is not reachable at {self.base}: {exc!r}") from exc
        raise AssertionError("unreachable")

    async def predict(self, request: web.Request, body: bytes) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in DROPPED}
        kind = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if kind == FORM or (not kind and body):
            headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
            headers["Content-Type"] = OCTET_STREAM
        headers.update(self._auth())
        status, answer_headers, data = await self._send(request.method, request.path_qs, body, headers)
        rewritten = rewrite_error(status, data)
        if rewritten is not None:
            return rewritten
        relayed = {k: v for k, v in answer_headers.items() if k.lower() in RELAYED}
        return web.Response(status=status, body=data, headers=relayed)

    async def predict_items(self, items: list[Item], top_k: int = 0) -> tuple[int, list[dict[str, Any]]]:
        """Encoded images go to the handler as JSON base64; decoded pixels are first encoded as PNG (lossless, so the
        handler decodes exactly these pixels)."""
        encoded = await asyncio.to_thread(lambda: [png(i) if isinstance(i, np.ndarray) else i for i in items])
        payload = json.dumps({"images": [base64.b64encode(e).decode() for e in encoded], "top_k": top_k}).encode()
        headers = {"Content-Type": "application/json", **self._auth()}
        status, _, data = await self._send("POST", f"/predictions/{self.model_name}", payload, headers)
        rewritten = rewrite_error(status, data)
        if rewritten is not None:
            status, data = rewritten.status, rewritten.body
        try:
            results = json.loads(data)
        except ValueError:
            results = None
        if not isinstance(results, list):
            message = data[:200].decode("utf-8", "replace")
            return 502 if status < 400 else status, [{"error": {"code": "bad_request", "message": message}}]
        return status, results

    async def health(self) -> tuple[int, dict[str, Any]]:
        status, _, data = await self._send("GET", "/ping", None, self._auth())
        try:
            return status, json.loads(data)
        except ValueError:
            return status, {"status": data[:200].decode("utf-8", "replace")}


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def rewrite_error(status: int, body: bytes) -> web.Response | None:
    """TorchServe's 400 `InvalidKeyException` → 401 JSON; 500 `ErrorDataDecoderException` → 400 with a one-item
    error list; "Worker died." (500, or 507 after a SIGKILL, which TorchServe takes for the out-of-memory killer) →
    503 with `Retry-After`, as the engine backend answers the batch of a worker that died; None for any other answer
    (relayed unchanged)."""
    if status == 400 and b'"InvalidKeyException"' in body:
        return error_response(
            401,
            "unauthorized",
            "missing or wrong token, send 'Authorization: Bearer <key>'",
            {"WWW-Authenticate": 'Bearer realm="deepclust"'},
        )
    if status == 500 and b'"ErrorDataDecoderException"' in body:
        try:
            detail = str(json.loads(body).get("message", ""))[:200]
        except (ValueError, AttributeError):
            detail = ""
        message = "malformed multipart/form-data body" + (f" ({detail})" if detail else "")
        payload = json.dumps([{"error": {"code": "bad_request", "message": message}}]).encode()
        return web.Response(status=400, body=payload, content_type="application/json")
    if status in (500, 507) and b'"Worker died."' in body:
        died = "the TorchServe worker running this request died (TorchServe: 'Worker died.'); it is restarted"
        return error_response(503, "unavailable", died, RETRY_AFTER)
    return None
