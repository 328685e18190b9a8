"""`deepclust serve --backend engine`: the front (`serving.hosts.serve.front`) runs the onnxruntime engine itself in
worker processes (`pool.py`, `worker.py`). No JVM, no TorchServe: for users whose security review refuses an
unmaintained server, and the shorter path (one hop less).

Processes and ports (defaults, the same as the TorchServe backend's): the front on `host:port` (127.0.0.1:8080) in a
thread of this process, `workers` engine processes (children of this one, talking over private socket pairs), the
Prometheus metrics (workers' aggregate + the front's) on `metrics_host:metrics_port` (127.0.0.1:8082). The same API,
JSON, per-item errors, metrics, token authorization and sha256 model check as the TorchServe backend.

Token authorization: with `token_auth` on (or `auto` off loopback) a random inference key is written to
`<state>/key_file.json` (0600, in the 0700 state directory; the same layout as TorchServe's, so `deepclust predict
--key-file` and the container's health check read it the same way); clients send `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from serving.hosts.engine_backend.pool import EnginePool, worker_environment
from serving.hosts.engine_backend.requests import parse_request
from serving.hosts.serve.config import ServeConfig, check_gpu, verify_model
from serving.hosts.serve.front import Front, Item, json_response, settings_from, warmup_image
from serving.hosts.serve.lifecycle import ManagedHost, common_ready_lines, run_in_foreground

BIG_BODY = 256 * 1024  # request bodies parsed off the event loop above this size


class EngineBackend:
    """The front's backend for `--backend engine`: parse the request, queue it for the workers."""

    name = "engine"

    def __init__(self, pool: EnginePool) -> None:
        self.pool = pool

    async def start(self) -> None:
        await self.pool.start()

    async def close(self) -> None:
        await self.pool.close()

    async def predict(self, request: web.Request, body: bytes) -> web.Response:
        args = (body, request.headers.get("Content-Type"))
        parsed = await _maybe_thread(parse_request, len(body) > BIG_BODY, *args)
        if parsed.request_error is not None:
            return json_response([{"error": {"code": "bad_request", "message": parsed.request_error}}], 400)
        return json_response(await self.pool.submit(parsed.items, parsed.top_k))

    async def predict_items(self, items: list[Item], top_k: int = 0) -> tuple[int, list[dict[str, Any]]]:
        return 200, await self.pool.submit(list(items), top_k)

    async def health(self) -> tuple[int, dict[str, Any]]:
        if self.pool.ready_workers:
            return 200, {"status": "Healthy"}
        reason = self.pool.fatal or "no engine worker is running (restarting)"
        return 503, {"status": "Unhealthy", "reason": reason}


async def _maybe_thread(fn, in_thread: bool, *args):
    import asyncio

    return await asyncio.to_thread(fn, *args) if in_thread else fn(*args)


class EngineHost(ManagedHost):
    """The engine backend for one model: `start()`, `wait_ready()`, `stop()`; also a context manager."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.state = config.cache_dir / "serve" / f"{config.model_name}-{config.port}"
        self.log_dir = config.log_dir or self.state / "logs"
        self.multiproc_dir = self.state / "prometheus-multiproc"
        self.front: Front | None = None
        self.pool: EnginePool | None = None
        self.metrics_server = None
        self._token: str | None = None

    @property
    def key_file(self) -> Path:
        return self.state / "key_file.json"

    def inference_token(self) -> str | None:
        return self._token

    def worker_config(self) -> dict[str, Any]:
        c = self.config
        return {
            "model_dir": str(c.model_dir),
            "variant": c.variant,
            "model_name": c.model_name,
            "providers": c.providers,
            "require_gpu": c.require_gpu,
            "intra_op_threads": c.intra_op_threads,
            "max_batch": c.max_batch,
            "max_bytes": c.max_bytes,
            "max_pixels": c.max_pixels,
            "spin": c.intra_op_spin,
        }

    def prepare(self) -> None:
        """Verify the model (sha256 against the card), check the GPU under `require_gpu`, write the state dir."""
        verify_model(self.config)
        if self.config.require_gpu:
            check_gpu(self.config)
        self.state.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state, 0o700)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.key_file.unlink(missing_ok=True)
        if self.config.auth_enabled:
            self._token = secrets.token_urlsafe(32)
            fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump({"inference": {"key": self._token}}, fh)

    def start(self) -> None:
        """Start order: metrics endpoint, the front with its pool (binds the public port: a busy port fails before
        any worker starts; the workers start on the front's loop)."""
        from serving.hosts.serve.telemetry import (
            FrontMetrics,
            multiprocess_registry,
            prepare_multiprocess_dir,
            start_metrics_server,
        )

        self.prepare()
        prepare_multiprocess_dir(self.multiproc_dir)
        registry = multiprocess_registry(self.multiproc_dir)
        front_metrics = FrontMetrics(registry)
        self.metrics_server = start_metrics_server(
            self.config.metrics_host, self.config.metrics_port, self.multiproc_dir, registry
        )
        c = self.config
        self.pool = EnginePool(
            c.workers,
            worker_environment(self.worker_config(), self.multiproc_dir),
            self.state,
            self.log_dir,
            batch_size=c.batch_size,
            max_batch_delay_ms=c.max_batch_delay_ms,
            queue_size=c.queue_size,
            startup_timeout_s=c.startup_timeout_s,
        )
        self.front = Front(settings_from(c, self.inference_token), EngineBackend(self.pool), front_metrics)
        self.front.start()

    def wait_ready(self) -> None:
        """Block until a real prediction (a small PNG, the warm-up) has a cluster: the front is then ready."""
        assert self.front is not None and self.pool is not None
        deadline = time.monotonic() + self.config.startup_timeout_s
        backend = self.front.backend
        while time.monotonic() < deadline:
            if self.pool.fatal is not None:
                raise RuntimeError(f"the engine workers cannot start: {self.pool.fatal}\n{self.log_tail()}")
            if self.pool.ready_workers:
                status, results = self.front.call(backend.predict_items([warmup_image()]), timeout=60)
                if status == 200 and "cluster" in results[0]:
                    self.front.mark_ready()
                    return
                raise RuntimeError(f"the warm-up prediction failed: {results}")
            time.sleep(0.1)
        raise TimeoutError(f"engine workers not ready after {self.config.startup_timeout_s}s:\n{self.log_tail()}")

    def worker_pids(self) -> list[int]:
        return self.pool.pids() if self.pool is not None else []

    def log_tail(self, lines: int = 40) -> str:
        chunks = []
        for path in sorted(self.log_dir.glob("engine_worker_*.log")):
            chunks.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(chunks)

    def stop(self) -> None:
        """Stop the front (its pool stops the workers: SIGTERM, then SIGKILL), then the metrics endpoint."""
        if self.front is not None:
            self.front.stop()
            self.front = None
        if self.pool is not None:
            for worker in self.pool.workers:  # the front's loop is gone: make sure no worker outlives us
                worker.reap()
        if self.metrics_server is not None:
            server, _thread = self.metrics_server
            server.shutdown()
            server.server_close()
            self.metrics_server = None


def serve_forever(config: ServeConfig, echo=print) -> int:
    """Start, print where everything is, block until Ctrl-C/SIGTERM; exit code."""
    host = EngineHost(config)

    def ready() -> list[str]:
        head, tail = common_ready_lines(config, host.key_file)
        url = f"{config.base_url}/predictions/{config.model_name}"
        return [
            f"ready (engine backend, no JVM): POST images to {url}",
            *head,
            *tail,
            f"  worker logs: {host.log_dir}   (Ctrl-C stops)",
        ]

    def wait() -> int:
        threading.Event().wait()  # until a signal interrupts it
        return 0

    return run_in_foreground(
        host,
        starting=f"deepclust serve: starting {config.workers} engine worker(s) for {config.model_name} …",
        ready=ready,
        wait=wait,
        stopping="stopping the engine workers …",
        echo=echo,
    )
