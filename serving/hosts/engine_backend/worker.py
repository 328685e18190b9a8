"""An engine worker process of `deepclust serve --backend engine`: `python -m serving.hosts.engine_backend.worker FD`.

It opens its engine with `serving.core.variants.open_engine` (the model store's resolver: the sha256 check against
the card, again, in the process that loads it; `variant: auto` picks FP16 on a GPU provider, FP32 on CPU; warm-up
included), says ready, then answers jobs from the front on the socket `FD` until the front closes it: every image
of every request of a server-side batch is decoded and resized (`serving.core.preprocess`), the good ones run
through the engine in one batch and the answers are split back per request. A bad image never fails its
neighbours. It records the same Prometheus metrics as a TorchServe worker (`ServiceMetrics`, multiprocess mode).
Settings come in the `DEEPCLUST_ENGINE_WORKER` environment variable (JSON).

Signals: SIGINT is ignored (Ctrl-C reaches the whole terminal process group; the front stops its workers itself with
SIGTERM); the worker also asks the kernel for SIGTERM when its parent dies, and exits at end-of-file on its socket.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import time
from multiprocessing.connection import Connection

import numpy as np

from serving.core.engine import assign
from serving.core.preprocess import DecodeLimits, ImageError, load_image, resize_for_model
from serving.core.results import Assignment, ItemError
from serving.core.runtime import tune_allocator
from serving.core.variants import open_engine
from serving.hosts.engine_backend.protocol import decode_job

CONFIG_ENV = "DEEPCLUST_ENGINE_WORKER"
log = logging.getLogger("deepclust.engine_worker")


class Worker:
    """The engine and the per-batch work of one worker process."""

    def __init__(self, config: dict) -> None:
        self.limits = DecodeLimits(max_bytes=int(config["max_bytes"]), max_pixels=int(config["max_pixels"]))
        # The store's resolver checks the opened file's sha256 against the card; `auto` as in serving.core.variants.
        self.engine = open_engine(
            config["model_dir"],
            config["variant"],
            providers=tuple(config["providers"]),
            intra_op_threads=int(config["intra_op_threads"]),
            max_batch=int(config["max_batch"]),
            warmup=True,
            require_gpu=bool(config["require_gpu"]),
            device_id=int(config.get("device_id", 0)),
            spin=bool(config.get("spin", False)),
        )
        from serving.hosts.serve.telemetry import ServiceMetrics

        self.metrics = ServiceMetrics.get()
        provider = self.engine.provider.removesuffix("ExecutionProvider").lower()
        e = self.engine
        self.metrics.set_model(config["model_name"], e.metadata.method, e.k, e.sha256, provider)

    def pixels(self, item: bytes | np.ndarray) -> np.ndarray:
        size = self.engine.input_size
        if isinstance(item, np.ndarray):
            from PIL import Image

            if item.shape[0] * item.shape[1] > self.limits.max_pixels:
                raise ImageError("too_large", f"the image has {item.shape[1]}x{item.shape[0]} pixels")
            return resize_for_model(Image.fromarray(np.ascontiguousarray(item), "RGB"), size)
        return load_image(item, size, self.limits)

    def run(self, message: bytes) -> bytes:
        requests = decode_job(message)
        answers: list[list[Assignment | ItemError | None]] = []
        arrays, where = [], []
        for r, (items, _top_k) in enumerate(requests):
            answer: list[Assignment | ItemError | None] = []
            for i, item in enumerate(items):
                if isinstance(item, str):
                    answer.append(ItemError.of("bad_request", item))
                    continue
                try:
                    arrays.append(self.pixels(item))
                    where.append((r, i))
                    answer.append(None)
                except ImageError as exc:
                    answer.append(ItemError.of(exc.code, exc.message))
            answers.append(answer)
        seconds = 0.0
        if arrays:
            top_k = max(k for _, k in requests)
            started = time.perf_counter()
            output = self.engine.run(np.stack(arrays))
            seconds = time.perf_counter() - started
            results = assign(output, self.engine.metadata.class_names, top_k=top_k)
            for (r, i), result in zip(where, results, strict=True):
                wanted = requests[r][1]
                result.top_k = result.top_k[:wanted] if wanted and result.top_k else None
                answers[r][i] = result
        public = [[_public(item) for item in answer] for answer in answers]
        self.metrics.observe_batch(public, len(arrays), seconds)
        return json.dumps({"results": public}).encode()


def _public(item: Assignment | ItemError | None) -> dict:
    if isinstance(item, Assignment):
        return item.public()
    assert item is not None
    return item.model_dump()


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):  # Linux prctl(PR_SET_PDEATHSIG, SIGTERM); elsewhere EOF is enough
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    tune_allocator()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s engine-worker %(process)d %(message)s")
    conn = Connection(int(argv[0]))
    config = json.loads(os.environ[CONFIG_ENV])
    try:
        worker = Worker(config)
    except Exception as exc:  # noqa: BLE001 - the reason goes to the front, which stops restarting
        conn.send_bytes(json.dumps({"fatal": f"{type(exc).__name__}: {exc}"}).encode())
        return 3
    # WARNING, not INFO: what `kubectl logs` shows.
    log.warning("deepclust engine worker ready on %s: %s", worker.engine.provider, json.dumps(worker.engine.describe()))
    conn.send_bytes(json.dumps({"ready": True, "pid": os.getpid(), "provider": worker.engine.provider}).encode())
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return 0
        try:
            answer = worker.run(message)
        except Exception as exc:  # noqa: BLE001 - this batch fails (500), the worker keeps serving
            log.exception("engine worker: batch failed")
            answer = json.dumps({"failed": f"{type(exc).__name__}: {exc}"}).encode()
        conn.send_bytes(answer)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
