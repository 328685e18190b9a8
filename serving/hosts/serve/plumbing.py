"""The front's request plumbing, shared by its own routes (`serving.hosts.serve.front`) and the Open Inference
Protocol routes (`serving.hosts.serve.v2`): settings, the backend protocol, the app state, errors and JSON answers,
the guard middleware (limits, token, metrics), reading a bounded body and calling the backend under a deadline.

Why a module of its own: the v2 routes need this plumbing and the front mounts the v2 routes; with the plumbing in the
front, the two modules imported each other.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from aiohttp import web

log = logging.getLogger("deepclust.front")

PREDICTION_PREFIX = "/predictions/"
STREAM_CHUNK = 1 << 16


@dataclass(frozen=True)
class FrontSettings:
    """Where to listen, the limits and the authorization (from `ServeConfig`, see `settings_from`)."""

    host: str
    port: int
    model_name: str = "model"
    max_request_bytes: int = 100 * (1 << 20)
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    read_timeout_s: float = 30.0  # to receive a request body
    keepalive_timeout_s: float = 75.0  # idle time between requests, and to receive a request head
    backend_timeout_s: float = 130.0  # for the backend's answer
    # Client token authorization: None = open; else a callable returning the inference key (None while the key does
    # not exist yet: every request is then refused).
    token: Callable[[], str | None] | None = None


class FrontError(Exception):
    """An error the front answers itself, as `{"error": {"code", "message"}}` (docs/design.md §3)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class BackendUnavailable(Exception):  # noqa: N818 - reads as a state
    """The backend cannot be reached (502)."""


RETRY_AFTER = {"Retry-After": "1"}
"""On the 503 for a request whose worker died (either backend): the worker is restarted unattended, and a prediction is
safe to send again."""


class RequestLost(Exception):  # noqa: N818 - reads as a state
    """The backend dropped this request without an answer (its worker died): 503 with `Retry-After`, since a
    prediction is safe to send again."""


Item = bytes | np.ndarray
"""One image for `Backend.predict_items`: encoded bytes, or decoded uint8 HWC RGB pixels."""


class Backend(Protocol):
    """What the front needs from a backend; every coroutine runs on the front's event loop."""

    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def predict(self, request: web.Request, body: bytes) -> web.Response:
        """Answer `POST /predictions/<model>` (the body is read and within limits): a JSON list, 200 or 400."""

    async def predict_items(self, items: list[Item], top_k: int = 0) -> tuple[int, list[dict[str, Any]]]:
        """(status, one result dict per item): 200 with per-item results/errors, or 400 with one error item."""

    async def health(self) -> tuple[int, dict[str, Any]]:
        """The backend's own health once the model has answered (status, JSON body) for `/ping`."""


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(payload).encode(), content_type="application/json")


class FrontState:
    """What handlers share: settings, backend, metrics, readiness."""

    def __init__(self, settings: FrontSettings, backend: Backend, metrics=None) -> None:
        self.settings, self.backend, self.metrics = settings, backend, metrics
        self.ready = False  # a real prediction has succeeded once (readiness, issue #24)

    def mark_ready(self) -> None:
        if not self.ready:
            log.warning("deepclust front: model answered a real prediction: ready")  # kubectl logs shows it
        self.ready = True


STATE: web.AppKey[FrontState] = web.AppKey("state", FrontState)


class _ClientFaults(logging.Filter):
    """aiohttp logs a malformed request (a client's fault, answered 400) at ERROR with a traceback: a hostile client
    could flood the log. Those records are dropped; anything else aiohttp logs stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, HttpProcessingError)


logging.getLogger("aiohttp.server").addFilter(_ClientFaults())


# ------------------------------------------------------------------------------------------------ middlewares
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Head limits, token authorization, metrics and JSON errors around every route."""
    state = request.app[STATE]
    s = state.settings
    counted = _is_prediction(request.path, request.method)
    started = time.perf_counter()
    try:
        head = len(request.raw_path) + sum(len(k) + len(v) + 4 for k, v in request.raw_headers)
        if head > s.max_header_bytes:
            raise FrontError(431, "bad_request", f"request head larger than {s.max_header_bytes} bytes")
        if len(request.raw_headers) > s.max_headers:
            raise FrontError(431, "bad_request", f"more than {s.max_headers} header fields")
        if s.token is not None:
            _authorize(request, s.token())
        response = await handler(request)
    except FrontError as exc:
        response = error_response(exc.status, exc.code, exc.message, exc.headers)
        if exc.status == 408:
            response.force_close()  # the client is slow or gone: do not wait for the rest of its body
    except web.HTTPException as exc:  # aiohttp's own (405 for a wrong method, …): same JSON shape
        response = error_response(exc.status, _CODES.get(exc.status, "bad_request"), exc.reason)
    except (asyncio.CancelledError, ConnectionError):
        raise  # the client went away
    except Exception:  # noqa: BLE001 - one bad request must not take the front down
        log.exception("front: unexpected error on %s %s", request.method, request.path[:200])
        response = error_response(500, "server_error", "internal error (logged)")
    if counted and state.metrics is not None:
        body = response.body if isinstance(response, web.Response) else None
        state.metrics.observe(time.perf_counter() - started, outcome_of(response.status, body))
    return response


def _authorize(request: web.Request, key: str | None) -> None:
    sent = request.headers.get("Authorization", "")
    scheme, _, token = sent.partition(" ")
    if key and scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
        return
    raise FrontError(
        401,
        "unauthorized",
        "missing or wrong token, send 'Authorization: Bearer <key>'",
        {"WWW-Authenticate": 'Bearer realm="deepclust"'},
    )


def _is_prediction(path: str, method: str) -> bool:
    if method not in ("POST", "PUT"):
        return False
    return path.startswith(PREDICTION_PREFIX) or (path.startswith("/v2/models/") and path.endswith("/infer"))


_CODES = {401: "unauthorized", 404: "not_found", 405: "bad_request", 413: "too_large"}


def outcome_of(status: int, body: bytes | None, fallback: str = "") -> str:
    """The low-cardinality outcome label of a prediction request, from its status and (for 200) its JSON body: a
    list of items (our API) or a v2 answer whose `error` output marks failed items."""
    if status == 200:
        try:
            payload = json.loads(body) if body is not None else None
        except ValueError:
            payload = None
        if isinstance(payload, dict):  # Open Inference Protocol answer
            errors_out = next((o for o in payload.get("outputs", []) if o.get("name") == "error"), None)
            flags = [bool(e) for e in errors_out.get("data", [])] if errors_out else []
        elif isinstance(payload, list):
            flags = [isinstance(item, dict) and "error" in item for item in payload]
        else:
            flags = []
        if not flags or not any(flags):
            return "ok"
        return "error" if all(flags) else "partial"
    return {
        400: "bad_request",
        401: "unauthorized",
        403: "unauthorized",
        404: "not_found",
        408: "timeout",
        413: "too_large",
        431: "bad_request",
        502: "backend_unavailable",
        503: "unavailable",
        504: "timeout",
    }.get(status, fallback if fallback in {"bad_request", "too_large", "timeout"} else "server_error")


# ------------------------------------------------------------------------------------------------ handlers
async def read_body(request: web.Request) -> bytes:
    """The request body (`Content-Length` or chunked, de-chunked by aiohttp) within the size and time limits."""
    s = request.app[STATE].settings
    limit = s.max_request_bytes
    if request.content_length is not None and request.content_length > limit:
        length = request.content_length
        raise FrontError(413, "too_large", f"request body of {length} bytes exceeds the limit of {limit}")
    chunks, total = [], 0
    try:
        async with asyncio.timeout(s.read_timeout_s):
            async for chunk in request.content.iter_chunked(STREAM_CHUNK):
                total += len(chunk)
                if total > limit:
                    raise FrontError(413, "too_large", f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError as exc:
        raise FrontError(408, "bad_request", "request body not received in time") from exc
    return b"".join(chunks)


async def call_backend(request: web.Request, work: Awaitable[Any]) -> Any:
    """Await a backend call within `backend_timeout_s`: 504 when late, 502 when the backend is unreachable, 503 when
    it dropped the request."""
    s = request.app[STATE].settings
    try:
        async with asyncio.timeout(s.backend_timeout_s):
            return await work
    except TimeoutError as exc:
        name = request.app[STATE].backend.name
        raise FrontError(504, "timeout", f"the {name} backend did not answer in time") from exc
    except BackendUnavailable as exc:
        raise FrontError(502, "backend_unavailable", str(exc)) from exc
    except RequestLost as exc:
        raise FrontError(503, "unavailable", str(exc), RETRY_AFTER) from exc


def check_model(request: web.Request, name: str) -> None:
    model = request.app[STATE].settings.model_name
    if name != model:
        raise FrontError(404, "not_found", f"model {name!r} is not served here (this service serves {model!r})")
