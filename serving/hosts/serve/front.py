"""The HTTP front of `deepclust serve`, on aiohttp: the one public port of either backend.

No HTTP parsing of our own: aiohttp's server parses requests (its C parser: request line, headers, chunked bodies,
`Expect: 100-continue`, ambiguous framing refused with a 400), keeps connections alive, closes a connection that has
not sent a complete request head within `keepalive_timeout_s` (also the first one: slowloris), and drains a refused
body for a moment before closing (lingering close). What the front adds on top, identical for both backends:

- routes: `GET /ping`, `POST|PUT /predictions/<model>` (our API, docs/design.md §3) and the Open Inference Protocol
  (KServe v2) REST endpoints (`serving.hosts.serve.v2`); any other path is a 404 JSON error (nothing else of a backend
  is reachable through the front);
- limits: request body ≤ `max_request_bytes` (413, also for chunked bodies), request head ≤ `max_header_bytes` and ≤
  `max_headers` fields (431; aiohttp's own parser limits sit at twice these and answer 400 beyond), body received
  within `read_timeout_s` (408), backend answer within `backend_timeout_s` (504), backend unreachable (502);
- client token authorization (`Authorization: Bearer <inference key>`, constant-time compare; 401 + `WWW-Authenticate`)
  on every route when the settings carry a token source;
- readiness: `/ping` and `/v2/health/ready` answer 503 until a real prediction has succeeded once (the host's
  warm-up counts), so that Kubernetes sends no traffic to a pod whose model is not loaded;
- metrics: end-to-end latency and outcome of every prediction request (`FrontMetrics`).

The backend (`Backend`) does the rest: the TorchServe backend forwards to TorchServe with aiohttp's client, the engine
backend runs `serving.core.engine.Engine` in worker processes. The front runs on its own event-loop thread
(`Front.start()` binds in the caller's thread, so a busy port fails there; `Front.stop()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
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
    """Await a backend call within `backend_timeout_s`: 504 when late, 502 when the backend is unreachable."""
    s = request.app[STATE].settings
    try:
        async with asyncio.timeout(s.backend_timeout_s):
            return await work
    except TimeoutError as exc:
        name = request.app[STATE].backend.name
        raise FrontError(504, "timeout", f"the {name} backend did not answer in time") from exc
    except BackendUnavailable as exc:
        raise FrontError(502, "backend_unavailable", str(exc)) from exc


def check_model(request: web.Request, name: str) -> None:
    model = request.app[STATE].settings.model_name
    if name != model:
        raise FrontError(404, "not_found", f"model {name!r} is not served here (this service serves {model!r})")


async def predictions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    check_model(request, request.match_info["model"])
    body = await read_body(request)
    response = await call_backend(request, state.backend.predict(request, body))
    if response.status == 200 and outcome_of(200, response.body) in ("ok", "partial"):
        state.mark_ready()
    return response


async def ping(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not state.ready:
        return json_response({"status": "Unhealthy", "reason": "no prediction has succeeded yet"}, 503)
    status, payload = await call_backend(request, state.backend.health())
    return json_response(payload, status)


async def not_found(request: web.Request) -> web.Response:
    raise FrontError(404, "not_found", f"no route {request.method} {request.path[:200]}")


def build_app(settings: FrontSettings, backend: Backend, metrics=None) -> web.Application:
    """The aiohttp application: routes, the guard middleware, the backend's start/close on the app's lifecycle."""
    from serving.hosts.serve import v2

    app = web.Application(middlewares=[guard], client_max_size=settings.max_request_bytes)
    app[STATE] = FrontState(settings, backend, metrics)
    app.router.add_get("/ping", ping)
    app.router.add_post("/predictions/{model}", predictions)
    app.router.add_put("/predictions/{model}", predictions)
    v2.add_routes(app)
    app.router.add_route("*", "/{tail:.*}", not_found)

    async def lifecycle(app: web.Application):
        await backend.start()
        yield
        await backend.close()

    app.cleanup_ctx.append(lifecycle)
    return app


# ------------------------------------------------------------------------------------------------ runner
class Front:
    """The front on its own event-loop thread; `start()` binds (errors raised in the caller's thread), `stop()`."""

    def __init__(self, settings: FrontSettings, backend: Backend, metrics=None) -> None:
        self.settings, self.backend, self.metrics = settings, backend, metrics
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.runner: web.AppRunner | None = None
        self.app: web.Application | None = None

    @property
    def state(self) -> FrontState:
        assert self.app is not None, "the front is not started"
        return self.app[STATE]

    def mark_ready(self) -> None:
        """Called by the host once its warm-up prediction succeeded (thread-safe: one attribute)."""
        self.state.mark_ready()

    def call(self, coroutine: Awaitable[Any], timeout: float | None = None) -> Any:
        """Run a coroutine on the front's loop from another thread (the host's warm-up) and wait for it."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def start(self) -> None:
        ready: dict[str, BaseException] = {}
        started = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self.loop = loop
            try:
                loop.run_until_complete(self._listen())
            except BaseException as exc:  # noqa: BLE001 - handed over to the caller's thread
                ready["error"] = exc
                started.set()
                with contextlib.suppress(Exception):
                    loop.run_until_complete(self._cleanup())
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._cleanup())
                pending = asyncio.all_tasks(loop)  # connection handlers aiohttp's cleanup left behind
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.close()

        self.thread = threading.Thread(target=run, name="deepclust-front", daemon=True)
        self.thread.start()
        started.wait()
        if "error" in ready:
            self.thread.join()
            self.thread = None
            raise ready["error"]

    async def _listen(self) -> None:
        s = self.settings
        self.app = build_app(s, self.backend, self.metrics)
        self.runner = web.AppRunner(
            self.app,
            handle_signals=False,
            access_log=None,
            keepalive_timeout=s.keepalive_timeout_s,
            lingering_time=2.0,
            # aiohttp's parser limits at twice ours: between the two the guard answers a JSON 431.
            max_line_size=2 * s.max_header_bytes,
            max_field_size=2 * s.max_header_bytes,
            max_headers=2 * s.max_headers,
            shutdown_timeout=2.0,
        )
        await self.runner.setup()
        site = web.TCPSite(self.runner, s.host, s.port, backlog=512, reuse_address=True)
        await site.start()

    async def _cleanup(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def stop(self) -> None:
        """Stop listening, close connections and the backend's sessions, join the thread; idempotent."""
        if self.loop is not None and self.thread is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=15)
        self.thread = None

    def __enter__(self) -> Front:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def warmup_image(size: int = 32) -> bytes:
    """A small grey PNG: the real prediction a host sends before it calls the service ready."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buffer, "PNG")
    return buffer.getvalue()


def settings_from(config, token: Callable[[], str | None] | None = None) -> FrontSettings:
    """FrontSettings from a `ServeConfig`; `token` (the inference key's source) is used only with token
    authorization on."""
    return FrontSettings(
        host=config.host,
        port=config.port,
        model_name=config.model_name,
        max_request_bytes=config.max_request_bytes,
        max_header_bytes=config.max_header_bytes,
        read_timeout_s=config.read_timeout_s,
        keepalive_timeout_s=config.keepalive_timeout_s,
        backend_timeout_s=config.response_timeout_s + 10,
        token=token if config.auth_enabled else None,
    )
