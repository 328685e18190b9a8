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
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from serving.hosts.serve import v2
from serving.hosts.serve.plumbing import (  # noqa: F401 - some re-exported: hosts import them from here
    STATE,
    Backend,
    BackendUnavailable,
    FrontError,
    FrontSettings,
    FrontState,
    Item,
    call_backend,
    check_model,
    error_response,
    guard,
    json_response,
    outcome_of,
    read_body,
)

log = logging.getLogger("deepclust.front")


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
