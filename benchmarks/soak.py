"""Soak: the service at 85 % of its measured maximum throughput for 10 minutes, on loopback, on each backend.

1. start `deepclust serve`'s host (`--backend torchserve`: TorchServe + the HTTP front; `--backend engine`: the front +
   engine worker processes; the shipped defaults otherwise) on free loopback ports;
2. find the maximum throughput briefly: closed-loop clients (keep-alive, TCP_NODELAY, one real CIFAR-10 JPEG per
   request) at a few concurrency levels, the best images/s wins;
3. soak: the same clients, paced to `--fraction` (default 0.85) of that maximum, for `--minutes` (default 10);
   every minute: requests, errors, images/s, p50/p99 latency, and the server's RSS (the JVM + its Python workers, or
   the engine workers, + this process, which hosts the front thread and the metrics endpoint).
Target (issue #21): 0 errors and RSS growth < 5 % (last minute vs the first minute, i.e. after warm-up).

    nohup .venv/bin/python benchmarks/soak.py > /tmp/soak.log 2>&1 &     # both backends, ~25 minutes, default model
    .venv/bin/python benchmarks/soak.py --backend engine --minutes 2 --probe-seconds 5    # a quick check

Writes benchmarks/results/soak.json: per backend one `summary` row + one `minute` row per minute (commit, machine,
backend on each); the rows of a backend not run this time are kept.
The clients run in a separate process: client threads sharing this process's GIL would slow the front down.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS_DIR, print_table, provenance, write_rows  # noqa: E402
from benchmarks.serve_load import (  # noqa: E402
    _free_port,
    _nice_client,
    backend_rss,
    load_images,
    make_host,
    predict_ok,
    run_level,
)
from serving.client import Client  # noqa: E402
from serving.hosts.serve.config import ServeConfig  # noqa: E402


def paced_clients(base_url, model, token, images, clients: int, rate: float, seconds: float) -> list[tuple]:
    """`clients` threads sending together `rate` requests/s (each on its own schedule, no catch-up bursts) for
    `seconds`; returns (finish time since start, latency s, ok) per request."""
    records: list[tuple[float, float, bool]] = []
    lock = threading.Lock()
    start = time.perf_counter()
    stop_at = start + seconds
    interval = clients / rate

    def worker(k: int) -> None:
        local, i = [], k
        next_send = start + interval * k / clients
        with Client(base_url, model, token=token) as client:
            while True:
                now = time.perf_counter()
                if next_send > now:
                    time.sleep(next_send - now)
                if time.perf_counter() >= stop_at:
                    break
                t = time.perf_counter()
                ok = predict_ok(client, images[i % len(images)])
                done = time.perf_counter()
                local.append((done - start, done - t, ok))
                i += clients
                next_send = max(next_send + interval, done - interval)  # fall behind: no burst to catch up
        with lock:
            records.extend(local)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def server_rss(host) -> dict[str, int]:
    """RSS in bytes of the backend's processes (JVM + workers, or engine workers) and this process (front + metrics)."""
    return backend_rss(host)


def minute_rows(records: list[tuple], minutes: int, rss: list[dict]) -> list[dict]:
    rows = []
    data = np.asarray(records, dtype=np.float64) if records else np.zeros((0, 3))
    for m in range(minutes):
        window = data[(data[:, 0] >= m * 60) & (data[:, 0] < (m + 1) * 60)]
        latencies = window[:, 1] * 1000
        sample = rss[m] if m < len(rss) else rss[-1]
        rows.append(
            {
                "kind": "minute",
                "minute": m + 1,
                "requests": int(len(window)),
                "errors": int((window[:, 2] == 0).sum()),
                "images_per_s": round(float(window[:, 2].sum()) / 60, 2),
                "p50_ms": round(float(np.percentile(latencies, 50)), 2) if len(window) else None,
                "p99_ms": round(float(np.percentile(latencies, 99)), 2) if len(window) else None,
                "rss_mb": round(sum(sample.values()) / 2**20, 1),
                **{f"rss_{k}_mb": round(v / 2**20, 1) for k, v in sample.items()},
            }
        )
    return rows


def soak(backend: str, args, images) -> list[dict]:
    """One backend: probe its maximum, soak at `fraction` of it; the summary row + one row per minute."""
    cache = Path(tempfile.mkdtemp(prefix="soak-"))
    config = ServeConfig(
        backend=backend,
        model=args.model,
        variant=args.variant,
        port=_free_port(),
        metrics_port=_free_port(),
        torchserve_metrics_port=_free_port(),
        cache_dir=cache,
        startup_timeout_s=300,
    )
    load_before = os.getloadavg()
    # The clients' process is niced: on a shared machine they yield to the service they load.
    with make_host(config) as host, multiprocessing.get_context("spawn").Pool(1, _nice_client) as pool:
        common = (config.base_url, config.model_name, host.inference_token(), images)
        pool.apply(run_level, (*common, max(args.probe_concurrency), 5.0))  # warm-up
        probes = []
        for concurrency in args.probe_concurrency:
            latencies, good, errors, elapsed = pool.apply(run_level, (*common, concurrency, args.probe_seconds))
            probes.append({"concurrency": concurrency, "images_per_s": good / elapsed, "errors": errors})
            print(f"{backend} probe c={concurrency}: {good / elapsed:.1f} images/s, {errors} errors", flush=True)
        max_rate = max(p["images_per_s"] for p in probes)
        rate = args.fraction * max_rate
        seconds = args.minutes * 60
        print(f"{backend} soak: {rate:.1f} req/s ({args.fraction:.0%} of {max_rate:.1f}) for {args.minutes} min")
        pending = pool.apply_async(paced_clients, (*common, args.clients, rate, seconds))
        started = time.monotonic()
        rss: list[dict] = []
        for m in range(args.minutes):  # one sample at the end of each minute
            time.sleep(max(0.0, started + (m + 1) * 60 - 1 - time.monotonic()))
            rss.append(server_rss(host))
            print(f"{backend} minute {m + 1}: rss {sum(rss[-1].values()) / 2**20:.0f} MiB", flush=True)
        records = pending.get(timeout=seconds + 300)
    rows = minute_rows(records, args.minutes, rss)
    total = sum(r["requests"] for r in rows)
    errors = sum(r["errors"] for r in rows)
    first, last = rows[0]["rss_mb"], rows[-1]["rss_mb"]
    latencies = np.asarray([r[1] for r in records]) * 1000
    summary = {
        "kind": "summary",
        "model": Path(args.model).name,
        "variant": args.variant,
        "max_images_per_s": round(max_rate, 2),
        "probes": [{k: round(v, 2) if isinstance(v, float) else v for k, v in p.items()} for p in probes],
        "target_rate": round(rate, 2),
        "fraction": args.fraction,
        "achieved_images_per_s": round((total - errors) / seconds, 2),
        "minutes": args.minutes,
        "clients": args.clients,
        "requests": total,
        "errors": errors,
        "p50_ms": round(float(np.percentile(latencies, 50)), 2),
        "p99_ms": round(float(np.percentile(latencies, 99)), 2),
        "rss_first_minute_mb": first,
        "rss_last_minute_mb": last,
        "rss_growth_pct": round(100 * (last - first) / first, 2),
        "server_batch": config.batch_size,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
    }
    print_table(rows, ["minute", "requests", "errors", "images_per_s", "p50_ms", "p99_ms", "rss_mb"])
    print(
        f"{backend}: errors {errors}/{total}; rss growth {summary['rss_growth_pct']}% (target 0 errors, < 5 %); "
        f"achieved {summary['achieved_images_per_s']} of target {summary['target_rate']} images/s"
    )
    return [summary, *rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", nargs="+", default=["torchserve", "engine"], choices=["torchserve", "engine"])
    parser.add_argument("--model", default=str(ROOT / "model_store" / "cifar10-lite0"))
    parser.add_argument("--variant", default="fp32")
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--fraction", type=float, default=0.85, help="of the measured maximum throughput")
    parser.add_argument("--probe-seconds", type=float, default=15.0, help="per concurrency level")
    parser.add_argument("--probe-concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--clients", type=int, default=32, help="paced clients during the soak")
    parser.add_argument("--images", type=int, default=500)
    args = parser.parse_args()

    images = load_images(args.images)
    rows = []
    for backend in args.backend:
        for row in soak(backend, args, images):
            row.update(backend=backend, command="python benchmarks/soak.py " + " ".join(sys.argv[1:]), **provenance())
            rows.append(row)
    path = RESULTS_DIR / "soak.json"
    kept = [r for r in json.loads(path.read_text()) if r.get("backend") not in args.backend] if path.exists() else []
    kept = [r for r in kept if r.get("backend")]  # rows from before the backend setting are replaced
    path = write_rows("soak", kept + rows)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
