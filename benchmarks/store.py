"""Which model `deepclust serve` serves when none is named: each store model's service throughput on this machine.

    python benchmarks/store.py                       # every model in model_store/, 15 s per concurrency level
    python benchmarks/store.py --models cifar10-lite0 --seconds 5

For every model folder with a card: the service is started as `deepclust serve` starts it (default backend and
settings, FP32), real CIFAR-10 JPEGs are posted by closed-loop clients on loopback, and the best images/s over the
concurrency levels is kept. The results go to `model_store/throughput.json`, which
`serving.core.model_store.default_model_name` reads: the most accurate model (its card's test ACC) whose service
reaches `MIN_SERVICE_IMG_PER_S` (100 img/s) is the default; and as rows to `benchmarks/results/store.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import print_table, provenance, write_rows  # noqa: E402
from benchmarks.serve_load import _free_port, bench_http, load_images, make_host  # noqa: E402
from serving.core.model_store import (  # noqa: E402
    MIN_SERVICE_IMG_PER_S,
    THROUGHPUT_FILE,
    MeasuredModel,
    StoreThroughput,
    default_model_name,
    load_card,
)
from serving.hosts.serve.config import ServeConfig  # noqa: E402


def store_models(store: Path) -> list[str]:
    """Model folders of the store that have a card (what the resolver can serve)."""
    return sorted(p.name for p in store.iterdir() if p.is_dir() and load_card(p) is not None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--models", nargs="*", help="model names (default: every model in the store)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--seconds", type=float, default=15.0, help="per concurrency level")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--backend", choices=["torchserve", "engine"], help="default: as `deepclust serve`")
    parser.add_argument("--out", default="store", help="results file: benchmarks/results/<out>.json")
    args = parser.parse_args(argv)
    command = "python benchmarks/store.py " + " ".join(sys.argv[1:] if argv is None else argv)

    images = load_images(args.images)
    cpus = len(os.sched_getaffinity(0))
    cache = Path(tempfile.mkdtemp(prefix="store-bench-"))
    rows, measured = [], {}
    for name in args.models or store_models(args.store):
        config = ServeConfig(
            **({"backend": args.backend} if args.backend else {}),
            model=str(args.store / name),
            port=_free_port(),
            metrics_port=_free_port(),
            torchserve_metrics_port=_free_port(),
            cache_dir=cache,
            startup_timeout_s=300,
        )
        with make_host(config) as host:
            levels = bench_http("service", host, images, args.concurrency, args.seconds)
        best = max(levels, key=lambda r: r["images_per_s"])
        card = load_card(args.store / name)
        acc = card.metrics.acc if card is not None else None
        measured[name] = MeasuredModel(variant=config.variant, service_img_per_s=best["images_per_s"], acc=acc)
        rows.append(
            {
                "model": name,
                "backend": config.backend,
                "variant": config.variant,
                "acc": acc,
                "backbone": card.backbone if card is not None else None,
                "service_img_per_s": best["images_per_s"],
                "concurrency": best["concurrency"],
                "p50_ms": best["p50_ms"],
                "p99_ms": best["p99_ms"],
                "errors": sum(r["errors"] for r in levels),
                # What other jobs distort less: serving CPU per image, and the rate it allows on this machine's cores
                # (reported beside the measured rate; the choice reads the measured rate).
                "cpu_ms_per_image": best.get("cpu_ms_per_image"),
                "cpu_bound_img_per_s": round(1000 * cpus / best["cpu_ms_per_image"], 1)
                if best.get("cpu_ms_per_image")
                else None,
                "load_average_1m": best.get("load_average_1m"),
                **provenance(),
                "command": command,
            }
        )
    info = provenance()
    previous = (
        StoreThroughput.model_validate_json((args.store / THROUGHPUT_FILE).read_text())
        if (args.store / THROUGHPUT_FILE).is_file()
        else None
    )
    models = {**(previous.models if previous else {}), **measured}
    record = StoreThroughput(machine=info["machine"], command=command, commit=info.get("commit"), models=models)
    (args.store / THROUGHPUT_FILE).write_text(json.dumps(record.model_dump(mode="json"), indent=2) + "\n")
    write_rows(args.out, rows, merge_on=("model", "backend", "variant"))
    columns = ["model", "backbone", "acc", "service_img_per_s", "cpu_bound_img_per_s", "load_average_1m", "errors"]
    print_table(rows, columns)
    chosen = default_model_name(args.store)
    print(f"default model (most accurate with >= {MIN_SERVICE_IMG_PER_S:g} img/s): {chosen}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
