"""Engine worker processes and server-side dynamic batching, on the front's event loop.

- `WorkerProcess`: one `python -m serving.hosts.engine_backend.worker` child and the parent's end of its socket pair
  (blocking calls, made from a small thread pool so that the event loop never waits on a worker).
- `EnginePool`: requests wait in one bounded queue (`queue_size`; full → 503). Each worker has a supervisor task
  that starts its process, then repeatedly takes a batch — the first waiting request, then more until `batch_size`
  requests or `max_batch_delay_ms` after the first, like TorchServe's batching — and sends it to its worker.
  A worker that dies is restarted unattended (back-off 0.5 s doubling to 10 s): the requests of the batch it was
  running get a 503 (the batch may be what killed it, so it is not retried); a batch taken for a worker found dead
  before sending goes back to the head of the line. A worker that cannot load the model at all (a `fatal` answer:
  missing provider under `require_gpu`, a changed model file) is not restarted and is reported.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from serving.hosts.engine_backend.protocol import Item, encode_job
from serving.hosts.serve.front import FrontError
from serving.hosts.serve.plumbing import RETRY_AFTER

log = logging.getLogger("deepclust.engine_pool")


class WorkerDied(Exception):  # noqa: N818 - reads as an event
    """The worker process ended (or its socket broke) while starting or running a batch."""


class WorkerFatal(Exception):  # noqa: N818 - reads as an event
    """The worker cannot load the model; restarting it would not help."""


class WorkerProcess:
    """One worker process; `spawn` blocks until it is ready (or raises), `call` runs one job."""

    def __init__(self, index: int, env: dict[str, str], cwd: Path, log_file: Path) -> None:
        self.index, self.env, self.cwd, self.log_file = index, env, cwd, log_file
        self.proc: subprocess.Popen | None = None
        self.conn: Connection | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self, timeout: float) -> dict[str, Any]:
        self.reap()
        parent, child = socket.socketpair()
        with open(self.log_file, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "serving.hosts.engine_backend.worker", str(child.fileno())],
                pass_fds=(child.fileno(),),
                env=self.env,
                cwd=self.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        child.close()
        self.conn = Connection(parent.detach())
        if not self.conn.poll(timeout):
            self.reap()
            raise WorkerDied(f"worker {self.index} not ready after {timeout:.0f} s")
        try:
            hello = json.loads(self.conn.recv_bytes())
        except (EOFError, OSError) as exc:
            self.reap()
            raise WorkerDied(f"worker {self.index} exited while starting (log: {self.log_file})") from exc
        if "fatal" in hello:
            self.reap()
            raise WorkerFatal(hello["fatal"])
        return hello

    def call(self, message: bytes) -> dict[str, Any]:
        assert self.conn is not None
        try:
            self.conn.send_bytes(message)
            return json.loads(self.conn.recv_bytes())
        except (EOFError, OSError) as exc:
            raise WorkerDied(f"worker {self.index} (pid {self.pid}) died: {exc!r}") from exc

    def reap(self, grace_s: float = 5.0) -> None:
        """Close the socket (an idle worker exits at end-of-file), SIGTERM, SIGKILL after `grace_s`; idempotent."""
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.close()
            self.conn = None
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(grace_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            self.proc = None


@dataclass
class Job:
    items: list[Item]
    top_k: int
    future: asyncio.Future


class EnginePool:
    """Worker processes behind one batching queue; `start`/`close` run on the front's loop."""

    def __init__(
        self,
        workers: int,
        env: dict[str, str],
        cwd: Path,
        log_dir: Path,
        *,
        batch_size: int = 16,
        max_batch_delay_ms: int = 10,
        queue_size: int = 1000,
        startup_timeout_s: float = 180.0,
    ) -> None:
        self.workers = [WorkerProcess(i, env, cwd, log_dir / f"engine_worker_{i}.log") for i in range(workers)]
        self.batch_size, self.delay = batch_size, max_batch_delay_ms / 1000
        self.queue_size, self.startup_timeout_s = queue_size, startup_timeout_s
        self.queue: asyncio.Queue[Job] | None = None
        self.pending: collections.deque[Job] = collections.deque()
        self.tasks: list[asyncio.Task] = []
        self.executor = concurrent.futures.ThreadPoolExecutor(2 * workers + 1, thread_name_prefix="engine-worker")
        self.ready_workers = 0
        self.restarts = 0
        self.fatal: str | None = None
        self.running = False

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.alive() and w.pid is not None]

    async def start(self) -> None:
        self.queue = asyncio.Queue(self.queue_size)
        self.running = True
        self.tasks = [asyncio.create_task(self._supervise(w)) for w in self.workers]

    async def close(self) -> None:
        self.running = False
        for task in self.tasks:
            task.cancel()
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, w.reap) for w in self.workers), return_exceptions=True)
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.executor.shutdown(wait=False, cancel_futures=True)
        for job in [*self.pending, *_drain(self.queue)]:
            if not job.future.done():
                job.future.set_exception(FrontError(503, "unavailable", "the service is stopping"))

    async def submit(self, items: list[Item], top_k: int = 0) -> list[dict[str, Any]]:
        """Queue one request's images; its per-item results once a worker has run the batch it joined."""
        assert self.queue is not None, "the pool is not started"
        if self.fatal is not None:
            raise FrontError(503, "unavailable", f"the engine workers cannot start: {self.fatal}")
        job = Job(items, top_k, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull as exc:
            raise FrontError(503, "unavailable", f"more than {self.queue_size} requests are waiting") from exc
        return await job.future

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _supervise(self, worker: WorkerProcess) -> None:
        backoff = 0.5
        first = True
        while self.running:
            if not first:
                self.restarts += 1
            first = False
            try:
                hello = await self._run(worker.spawn, self.startup_timeout_s)
            except WorkerFatal as exc:
                self.fatal = str(exc)
                log.error("engine worker %d cannot start, not restarting it: %s", worker.index, exc)
                return
            except WorkerDied as exc:
                log.warning("engine worker %d failed to start (retry in %.1f s): %s", worker.index, backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            log.warning("engine worker %d ready (pid %s, %s)", worker.index, hello.get("pid"), hello.get("provider"))
            backoff = 0.5
            self.ready_workers += 1
            try:
                await self._serve(worker)
            finally:
                self.ready_workers -= 1
            if self.running:
                log.warning("engine worker %d (pid %s) died: restarting it", worker.index, worker.pid)
                await self._run(worker.reap)

    async def _serve(self, worker: WorkerProcess) -> None:
        """Batches for one live worker until it dies (returns) or the pool closes (cancelled)."""
        while self.running:
            batch = await self._collect()
            if not batch:
                continue
            if not worker.alive():  # died while idle: nothing of this batch ran, it goes back to the head
                self.pending.extendleft(reversed(batch))
                return
            message = await self._run(encode_job, [(job.items, job.top_k) for job in batch])
            try:
                answer = await self._run(worker.call, message)
            except WorkerDied as exc:
                died = f"the engine worker running this request died ({exc}); it is restarted"
                _fail(batch, FrontError(503, "unavailable", died, RETRY_AFTER))
                return
            if "failed" in answer:
                _fail(batch, FrontError(500, "server_error", f"the batch failed: {answer['failed']}"))
                continue
            for job, results in zip(batch, answer["results"], strict=True):
                if not job.future.done():
                    job.future.set_result(results)

    async def _collect(self) -> list[Job]:
        """The next server-side batch: what is waiting, then more until `batch_size` or the delay after the first."""
        assert self.queue is not None
        batch: list[Job] = []
        while self.pending and len(batch) < self.batch_size:
            batch.append(self.pending.popleft())
        if not batch:
            batch.append(await self.queue.get())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.delay
        while len(batch) < self.batch_size:
            try:
                batch.append(self.queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    batch.append(await self.queue.get())
            except TimeoutError:
                break
        return [job for job in batch if not job.future.done()]  # a client that went away is skipped


def _fail(batch: list[Job], error: Exception) -> None:
    for job in batch:
        if not job.future.done():
            job.future.set_exception(error)


def _drain(queue: asyncio.Queue | None) -> list[Job]:
    jobs = []
    while queue is not None and not queue.empty():
        jobs.append(queue.get_nowait())
    return jobs


def worker_environment(config: dict[str, Any], multiproc_dir: Path) -> dict[str, str]:
    """The workers' environment: allocator setting, metrics directory, settings, one OpenMP thread."""
    from serving.core.runtime import allocator_environment
    from serving.hosts.engine_backend.worker import CONFIG_ENV
    from serving.hosts.serve.telemetry import MULTIPROC_ENV

    env = allocator_environment(dict(os.environ))
    root = str(Path(__file__).resolve().parents[3])  # the checkout or site-packages holding `serving`
    env.update(
        {
            MULTIPROC_ENV: str(multiproc_dir),
            CONFIG_ENV: json.dumps(config),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p),
        }
    )
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
