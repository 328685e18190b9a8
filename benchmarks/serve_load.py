"""Load test: the service on each backend vs the bare engine (vs a plain torch-eager TorchServe handler), on real
CIFAR-10 JPEGs.

Closed-loop clients on loopback (TCP_NODELAY, keep-alive, one raw image per request) for a bounded time per level,
in their own process. The engine rows run decode + resize + onnxruntime on batches of the same images in another
process (`concurrency` is then the batch size): the ceiling the service should approach. Targets (issue #21):
service / bare engine at its best batch >= 0.9 on the engine backend, >= 0.85 on the TorchServe backend, 0 errors.

    .venv/bin/python benchmarks/serve_load.py --skip-eager       # both backends, default model, a few minutes
    .venv/bin/python benchmarks/serve_load.py --backend engine --seconds 5 --concurrency 1 8
`service` rows (with their `backend`) go through the HTTP front of `deepclust serve` (serving/hosts/serve/front.py),
as every client does; `--direct` adds `torchserve_direct` rows on TorchServe's internal port (same server, no front)
to show the front's overhead. Each service row carries the peak RSS during its level: the backend's processes (the
JVM and its workers, or the engine workers) and the process hosting the front (this one).
Writes benchmarks/results/serve_load.json (rows: target, backend, concurrency, images_per_s, p50_ms, p99_ms, errors,
rss_*_mb, ...).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MALLOC_MMAP_MAX_", "0")  # fair torch-eager baseline (glibc malloc tuned); harmless for the rest
os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", "100000000000")

from benchmarks.common import print_table, provenance, write_rows  # noqa: E402
from serving.client import Client  # noqa: E402
from serving.core.engine import Engine  # noqa: E402
from serving.core.preprocess import load_image  # noqa: E402
from serving.hosts.serve.config import ServeConfig  # noqa: E402
from serving.hosts.torchserve.server import TorchServeHost  # noqa: E402


def make_host(config: ServeConfig, handler: Path | None = None):
    if config.backend == "engine":
        from serving.hosts.engine_backend.host import EngineHost

        return EngineHost(config)
    return TorchServeHost(config, handler=handler) if handler else TorchServeHost(config)


def server_processes(host) -> list:
    """The processes serving: this one (the front's thread) and the backend's (JVM + workers, or engine workers)."""
    import psutil

    if host.config.backend == "engine":
        procs = [psutil.Process(pid) for pid in host.worker_pids()]
    else:
        jvm = psutil.Process(host.process.pid)
        procs = [jvm, *jvm.children(recursive=True)]
    return [psutil.Process(), *procs]


def cpu_seconds(processes) -> float:
    """User + system CPU seconds of `processes` so far (a process that is gone counts 0)."""
    import psutil

    total = 0.0
    for p in processes:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def process_groups(host) -> dict[str, list]:
    """The serving processes by role: `front_process` (this one: the front's thread, the metrics endpoint), `jvm`
    (TorchServe's Java frontend) and `workers` (TorchServe's Python workers, or the engine workers)."""
    import psutil

    groups = {"front_process": [psutil.Process()]}
    if host.config.backend == "engine":
        groups["workers"] = [psutil.Process(pid) for pid in host.worker_pids()]
    else:
        jvm = psutil.Process(host.process.pid)
        groups["jvm"] = [jvm]
        groups["workers"] = jvm.children(recursive=True)
    return groups


def _nice_client() -> None:
    """Pool initializer of the load clients: they yield the CPU to the servers they load (and to the bare engine)."""
    os.nice(5)


def backend_rss(host) -> dict[str, int]:
    """RSS in bytes of the backend's processes (JVM + its Python workers, or the engine workers) and of this
    process (the front's thread, the metrics endpoint)."""
    import psutil

    if host.config.backend == "engine":
        procs = [psutil.Process(pid) for pid in host.worker_pids()]
        out = {"workers": sum(p.memory_info().rss for p in procs)}
    else:
        jvm = psutil.Process(host.process.pid)
        out = {"jvm": jvm.memory_info().rss, "workers": sum(p.memory_info().rss for p in jvm.children(recursive=True))}
    out["front_process"] = psutil.Process().memory_info().rss
    return out


def cifar10_test_tar() -> Path:
    """The shared data's CIFAR-10 test JPEGs (`$DEEPCLUST_DATA`, else `../shared/data`)."""
    return Path(os.environ.get("DEEPCLUST_DATA", ROOT.parent / "shared" / "data")) / "cifar10" / "test.tar"


def load_images(n: int) -> list[bytes]:
    """The first `n` CIFAR-10 test JPEGs, as encoded bytes (what clients post)."""
    images = []
    with tarfile.open(cifar10_test_tar()) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                images.append(tar.extractfile(member).read())
                if len(images) >= n:
                    break
    return images


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def summarise(target, concurrency, latencies, images, errors, seconds, **extra):
    """One result row; `load_average_1m` says how busy the shared machine was when the row was measured."""
    lat = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    return {
        "load_average_1m": round(os.getloadavg()[0], 2),
        "target": target,
        "concurrency": concurrency,
        "images_per_s": round(images / seconds, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "errors": errors,
        **extra,
        **provenance(),
    }


def bench_engine(model_file: Path, images: list[bytes], batches: list[int], seconds: float) -> list[dict]:
    engine = Engine(model_file, max_batch=max(batches))
    rows = []
    for batch in batches:
        latencies, done, n = [], 0, 0
        cpu = time.process_time()  # every thread of this process, onnxruntime's included
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            t = time.perf_counter()
            chunk = [images[(n + i) % len(images)] for i in range(batch)]
            engine.run(np.stack([load_image(b, engine.input_size) for b in chunk]))
            latencies.append(time.perf_counter() - t)
            done += batch
            n += batch
        rows.append(
            summarise(
                "engine",
                batch,
                latencies,
                done,
                0,
                time.perf_counter() - start,
                note="in-process decode+resize+run, concurrency = batch size",
                cpu_ms_per_image=round(1000 * (time.process_time() - cpu) / max(done, 1), 3),
            )
        )
    return rows


_ENGINE: dict = {}


def _engine_init(model_file: Path, max_batch: int, own_session: bool = False) -> None:
    """The bare engine's pool process. `own_session`: in a session of its own, i.e. the scheduling position of
    TorchServe's JVM and workers (`TorchServeHost` starts them with `start_new_session`). Linux's autogroup scheduler
    (on by default on desktop kernels, and on this machine) shares the cores between sessions first: compared from
    this process's session, a service whose engine runs in another session gets a whole extra share of a busy
    machine, and the ratio would measure the scheduler, not the service."""
    if own_session:
        os.setsid()
    for spin in (True, False):
        _ENGINE[spin] = Engine(model_file, max_batch=max_batch, spin=spin)


def engine_level(images: list[bytes], batch: int, seconds: float, spin: bool = True) -> tuple[float, float]:
    """(images/s, CPU ms per image) of the bare engine (decode + resize + run) at `batch`, in a pool process holding
    the engines (onnxruntime's intra-op threads spinning or not)."""
    engine, done, start, cpu = _ENGINE[spin], 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        chunk = [images[(done + i) % len(images)] for i in range(batch)]
        engine.run(np.stack([load_image(b, engine.input_size) for b in chunk]))
        done += batch
    return done / (time.perf_counter() - start), 1000 * (time.process_time() - cpu) / max(done, 1)


def bench_paired(
    host, images, engine_pool, batch: int, concurrency: int, seconds: float, rounds: int, warmup: float = 3.0
) -> list[dict]:
    """The bare engine and the service measured in turns, `rounds` times: each ratio compares two measurements a
    few seconds apart, so the other jobs of a shared machine disturb both alike (their median is the figure).
    Each turn also records CPU milliseconds per image (the bare engine's process; every serving process), whose
    ratio does not depend on how much of a busy machine each side got."""
    rows = []
    args = (host.config.base_url, host.config.model_name, host.inference_token(), images)
    with multiprocessing.get_context("spawn").Pool(1, _nice_client) as clients:
        clients.apply(run_level, (*args, concurrency, warmup))  # warm-up (the JVM's JIT compiles the hot path)
        for r in range(rounds):
            # The bare engine at its best: with and without spinning intra-op threads (which wins depends on how
            # busy the cores are), the better of the two is the reference.
            bare_spin, cpu_spin = engine_pool.apply(engine_level, (images, batch, seconds, True))
            bare_nospin, cpu_nospin = engine_pool.apply(engine_level, (images, batch, seconds, False))
            bare, bare_cpu = max((bare_spin, cpu_spin), (bare_nospin, cpu_nospin))
            processes = server_processes(host)
            cpu = cpu_seconds(processes)
            latencies, good, errors, elapsed = clients.apply(run_level, (*args, concurrency, seconds))
            service, service_cpu = good / elapsed, 1000 * (cpu_seconds(processes) - cpu) / max(good, 1)
            row = {"target": "paired", "backend": host.config.backend, "round": r, "engine_batch": batch,
                   "concurrency": concurrency, "engine_images_per_s": round(bare, 2),
                   "engine_spin_images_per_s": round(bare_spin, 2), "engine_nospin_images_per_s": round(bare_nospin, 2),
                   "service_images_per_s": round(service, 2), "ratio": round(service / bare, 3), "errors": errors,
                   "engine_cpu_ms_per_image": round(bare_cpu, 3), "service_cpu_ms_per_image": round(service_cpu, 3),
                   "cpu_ratio": round(bare_cpu / service_cpu, 3) if service_cpu else None,
                   "bare_engine_session": "own" if host.config.backend == "torchserve" else "shared",
                   "load_average_1m": round(os.getloadavg()[0], 2), **provenance()}  # fmt: skip
            rows.append(row)
            print(row, flush=True)
    return rows


def run_level(base_url: str, model_name: str, token, images, concurrency: int, seconds: float):
    """`concurrency` closed-loop clients for `seconds`: (latencies, good images, errors, elapsed)."""
    latencies: list[float] = []
    counters = {"images": 0, "errors": 0}
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker(offset: int) -> None:
        local, ok, bad, i = [], 0, 0, offset
        with Client(base_url, model_name, token=token) as client:
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                good = predict_ok(client, images[i % len(images)])
                local.append(time.perf_counter() - t)
                ok, bad, i = ok + good, bad + (not good), i + concurrency
        with lock:
            latencies.extend(local)
            counters["images"] += ok
            counters["errors"] += bad

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, counters["images"], counters["errors"], time.perf_counter() - start


def bench_http(target, host, images, levels, seconds, base_url: str | None = None, warmup: float = 3.0) -> list[dict]:
    """Through the HTTP front (`base_url` None) or straight to TorchServe's internal port (`base_url` given)."""
    rows = []
    args = (base_url or host.config.base_url, host.config.model_name, host.inference_token(), images)
    # The clients run in their own process: the front is a thread of the process that started the host (here, this
    # one), and client threads sharing its GIL would slow it down as no real client does.
    with multiprocessing.get_context("spawn").Pool(1, _nice_client) as pool:
        pool.apply(run_level, (*args, max(levels), warmup))  # warm-up (the JVM's JIT too), not recorded
        for concurrency in levels:
            processes = server_processes(host)
            cpu = cpu_seconds(processes)
            groups = process_groups(host)
            cpu_by_group = {name: cpu_seconds(procs) for name, procs in groups.items()}
            pending = pool.apply_async(run_level, (*args, concurrency, seconds))
            peak: dict[str, int] = {}
            while not pending.ready():  # the peak RSS during the level, sampled twice a second
                for key, value in backend_rss(host).items():
                    peak[key] = max(peak.get(key, 0), value)
                pending.wait(0.5)
            latencies, good, errors, elapsed = pending.get()
            # CPU per image of every serving process (clients excluded): a figure the other jobs on this shared
            # machine do not distort the way they distort images/s.
            rss = {"cpu_ms_per_image": round(1000 * (cpu_seconds(processes) - cpu) / max(good, 1), 3)}
            for name, procs in groups.items():  # the same CPU, by process: where the service's overhead goes
                spent = cpu_seconds(procs) - cpu_by_group[name]
                rss[f"cpu_ms_per_image_{name}"] = round(1000 * spent / max(good, 1), 3)
            rss.update({f"rss_{k}_mb": round(v / 2**20, 1) for k, v in peak.items()})
            rss["rss_total_mb"] = round(sum(peak.values()) / 2**20, 1)
            rows.append(
                summarise(target, concurrency, latencies, good, errors, elapsed, backend=host.config.backend, **rss)
            )
            print(rows[-1], flush=True)
    return rows


def predict_ok(client, image: bytes) -> bool:
    """One raw-body prediction; True when the service answered 200 with a cluster (errors and resets are False)."""
    try:
        status, body = client.post(image, "application/octet-stream")
    except OSError:
        return False
    return status == 200 and isinstance(body, list) and "cluster" in body[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "model_store" / "cifar10-lite0"))
    parser.add_argument("--variant", default="fp32")
    parser.add_argument("--seconds", type=float, default=15.0, help="per level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--backend", nargs="+", default=["torchserve", "engine"], choices=["torchserve", "engine"])
    parser.add_argument("--batch-size", type=int, default=32, help="server-side batch (requests), either backend")
    parser.add_argument("--max-batch-delay-ms", type=int, default=5)
    parser.add_argument("--skip-eager", action="store_true")
    parser.add_argument(
        "--warmup",
        type=float,
        default=10.0,
        help="seconds of load before each backend's measurements (TorchServe's JVM compiles its hot path meanwhile)",
    )
    parser.add_argument(
        "--paired-rounds",
        type=int,
        default=0,
        help="also measure bare engine (at its best batch above) and service (at the largest concurrency) in turns, "
        "this many rounds per backend: ratios robust to a shared machine's load",
    )
    parser.add_argument(
        "--direct",
        action="store_true",
        help="also load TorchServe's internal port directly (target torchserve_direct): the HTTP front's overhead",
    )
    args = parser.parse_args()

    images = load_images(args.images)
    cache = Path(tempfile.mkdtemp(prefix="serve-load-"))

    def config(backend: str = "torchserve"):
        return ServeConfig(
            backend=backend,
            model=args.model,
            variant=args.variant,
            port=_free_port(),
            metrics_port=_free_port(),
            torchserve_metrics_port=_free_port(),
            cache_dir=cache,
            batch_size=args.batch_size,
            max_batch_delay_ms=args.max_batch_delay_ms,
            startup_timeout_s=300,
        )

    rows = []
    first = config()
    # The bare engine in its own process, so that this process (which hosts the front) measures as the service's.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        rows += pool.apply(bench_engine, (first.model_file, images, args.batches, args.seconds))
    best_batch = max((r for r in rows if r["target"] == "engine"), key=lambda r: r["images_per_s"])["concurrency"]
    for backend in args.backend:
        engine_pool = None
        if args.paired_rounds:  # the bare engine where the backend runs its engine: its own session for TorchServe
            own_session = backend == "torchserve"
            initargs = (first.model_file, max(args.batches), own_session)
            engine_pool = multiprocessing.get_context("spawn").Pool(1, _engine_init, initargs)
        with make_host(config(backend)) as host:
            if engine_pool is not None:
                rows += bench_paired(
                    host,
                    images,
                    engine_pool,
                    best_batch,
                    max(args.concurrency),
                    args.seconds,
                    args.paired_rounds,
                    args.warmup,
                )
            rows += bench_http("service", host, images, args.concurrency, args.seconds, warmup=args.warmup)
            if args.direct and backend == "torchserve":
                direct = f"http://127.0.0.1:{host.backend_port}"
                rows += bench_http("torchserve_direct", host, images, args.concurrency, args.seconds, direct)
        if engine_pool is not None:
            engine_pool.close()
            engine_pool.join()
    if not args.skip_eager:
        with make_host(config(), handler=ROOT / "benchmarks" / "eager_handler.py") as host:
            rows += bench_http("eager_handler", host, images, args.concurrency, args.seconds)
    run_id = provenance()["commit"] + time.strftime("@%Y-%m-%dT%H:%M:%S")
    for row in rows:
        row.update(model=Path(args.model).name, variant=args.variant, server_batch=args.batch_size, run=run_id)
        row["command"] = "python benchmarks/serve_load.py " + " ".join(sys.argv[1:])
    path = write_rows("serve_load", rows)
    columns = ["target", "backend", "concurrency", "images_per_s", "p50_ms", "p99_ms", "errors", "rss_total_mb"]
    print_table([r for r in rows if r["target"] != "paired"], columns)
    best_engine = max(r["images_per_s"] for r in rows if r["target"] == "engine")
    targets = {"engine": 0.9, "torchserve": 0.85}
    for backend in args.backend:
        service = [r for r in rows if r["target"] == "service" and r.get("backend") == backend]
        best = max((r["images_per_s"] for r in service), default=0)
        errors = sum(r["errors"] for r in service)
        print(f"{backend}: service/engine = {best / best_engine:.2f} (target >= {targets[backend]}), {errors} errors")
        engine_cpu = min(r["cpu_ms_per_image"] for r in rows if r["target"] == "engine")
        service_cpu = min((r["cpu_ms_per_image"] for r in service), default=float("nan"))
        print(
            f"{backend}: CPU per image, bare engine at its best batch / service at its best level = "
            f"{engine_cpu:.2f} / {service_cpu:.2f} ms = {engine_cpu / service_cpu:.2f}"
        )
        if service:
            lean = min(service, key=lambda r: r["cpu_ms_per_image"])
            parts = {
                k.removeprefix("cpu_ms_per_image_"): v for k, v in lean.items() if k.startswith("cpu_ms_per_image_")
            }
            print(f"{backend}: CPU ms per image by process at c={lean['concurrency']}: {parts}")
        paired = [r for r in rows if r["target"] == "paired" and r["backend"] == backend]
        if paired:
            ratios, cpu_ratios = [r["ratio"] for r in paired], [r["cpu_ratio"] for r in paired]
            print(f"{backend}: paired rounds service/engine = {ratios}, median {float(np.median(ratios)):.2f}")
            print(
                f"{backend}: paired rounds CPU per image, bare engine / service = {cpu_ratios}, "
                f"median {float(np.median(cpu_ratios)):.2f}"
            )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
