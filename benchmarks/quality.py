"""Clustering quality on fixed seeds: every method through the same trainer, plus a k-means baseline.

    python benchmarks/quality.py --suite cifar10_lite0 --only cc kmeans
    python benchmarks/quality.py --suite fashion_mnist --only cc kmeans

Rows go to `benchmarks/results/quality.json` (a row is replaced when dataset, method, backbone and seed match):
`{dataset, split, method, backbone, acc, nmi, ari, seconds, commit, machine, config, overrides, extra}`.
A method is an entry of `SUITES` (config file + overrides); add ablations there, never a second script.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import print_table, provenance, write_rows  # noqa: E402

CONFIGS = ROOT / "configs"


@dataclass(frozen=True)
class Experiment:
    method: str  # the row's `method` (e.g. "cc", "cces-nn_single-ccrop_off", "scan-selflabel")
    config: str  # file in configs/
    overrides: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


def _cces_ablations(config: str) -> dict[str, Experiment]:
    """CCES (NN(double) + ContrastiveCrop) and the CCES paper's Table 4 grid: RCrop/CCrop x none/single1/single2/double,
    one config (`cces` is the paper's full method, the CCrop x double cell)."""
    rows = {"cces": Experiment("cces", config, ("method.nn=double", "method.ccrop=true"))}
    for nn in ("none", "single1", "single2", "double"):
        for ccrop in ("on", "off"):
            if (nn, ccrop) != ("double", "on"):
                name = f"cces-nn_{nn}-ccrop_{ccrop}"
                rows[name] = Experiment(name, config, (f"method.nn={nn}", f"method.ccrop={str(ccrop == 'on').lower()}"))
    return rows


def _short_budget(plain: dict[str, str], rows: dict[str, Experiment], epochs: int) -> dict[str, Experiment]:
    """The same experiments at a shorter epoch budget (`<method>-ep<N>`), for side-by-sides a shared CPU can afford;
    every method gets the same budget, so the comparison stays fair."""
    out = {f"{k}-ep{epochs}": Experiment(f"{k}-ep{epochs}", c, (f"optim.epochs={epochs}",)) for k, c in plain.items()}
    for key, e in rows.items():
        out[f"{key}-ep{epochs}"] = Experiment(f"{key}-ep{epochs}", e.config, (*e.overrides, f"optim.epochs={epochs}"))
    return out


def _scan_rows(config: str, variant: str = "", overrides: tuple[str, ...] = ()) -> dict[str, Experiment]:
    """SCAN after clustering and after self-labelling: two rows from the stages of one pipeline run (a `variant`
    names a different run of the same config, e.g. `officialviews`)."""
    prefix = f"scan-{variant}" if variant else "scan"
    run = {"run": variant} if variant else {}
    return {
        prefix: Experiment(prefix, config, overrides, extra={"stage": "scan", **run}),
        f"{prefix}-selflabel": Experiment(
            f"{prefix}-selflabel", config, overrides, extra={"stage": "selflabel", **run}
        ),
    }


# SCAN's official strong view on both sides (4 of 14 ops + Cutout, two cached passes); the frozen-feature configs
# default to the CC augmentation passes instead (a named deviation, README "Methods as their papers define them").
OFFICIAL_VIEWS = ("method.strong_passes=[strong0,strong1]",)


THREE_SPACES = "model.backbone=[effnet_lite0,effnet_lite1,effnet_lite2]"
THREE_TAPPED = "model.backbone=[effnet_lite0_taps,effnet_lite1_taps,effnet_lite2_taps]"
TRANSDUCTIVE = "data.train_split=test"  # fit and score on the test images
TRANSDUCTIVE_3SPACES = (THREE_SPACES, TRANSDUCTIVE)

SUITES: dict[str, dict[str, Experiment]] = {
    "fashion_mnist": {
        "cc": Experiment("cc", "fashion_mnist_cc.yaml"),
        **_cces_ablations("fashion_mnist_cces.yaml"),
        **_scan_rows("fashion_mnist_scan.yaml"),
    },
    "fashion_mnist_spaces": {  # Fashion-MNIST through the same frozen spaces (transductive: test -> test)
        "turtle-3spaces": Experiment("turtle", "fashion_mnist_spaces_turtle.yaml"),
    },
    "cifar10_spaces": {  # the wheel-shipped spaces as one model (`benchmarks/spaces.py` gives their ceilings)
        "turtle": Experiment("turtle", "cifar10_spaces_turtle.yaml"),
        **{
            f"turtle-{b}": Experiment("turtle", "cifar10_spaces_turtle.yaml", (f"model.backbone={b}",))
            for b in ("effnet_lite0", "effnet_lite1", "effnet_lite2")
        },
        "turtle-3spaces": Experiment(  # every wheel-shipped space (the row's backbone names them)
            "turtle", "cifar10_spaces_turtle.yaml", (THREE_SPACES,)
        ),
        "turtle-3taps": Experiment("turtle", "cifar10_spaces_turtle.yaml", (THREE_TAPPED,)),
        **_scan_rows("cifar10_spaces_scan.yaml"),
        **_scan_rows("cifar10_spaces_scan.yaml", "officialviews", OFFICIAL_VIEWS),
    },
    # The four methods on the three wheel-shipped spaces, compared on one protocol: fitted and scored on the 10,000
    # test images (transductive, as official CC; the rows' train_split says so), so the passes to extract are 30,000
    # clean + 60,000 augmented (+ 60,000 for CCES's heat maps and crops) instead of 480,000. The budgets in
    # optimisation steps equal the train -> test configs' (a fifth of the images: five times the epochs).
    "cifar10_3spaces_transductive": {
        "cc": Experiment("cc-transductive", "cifar10_lite0_cc.yaml", (*TRANSDUCTIVE_3SPACES, "optim.epochs=200")),
        "cces": Experiment("cces-transductive", "cifar10_lite0_cces.yaml", (*TRANSDUCTIVE_3SPACES, "optim.epochs=200")),
        **_scan_rows(
            "cifar10_spaces_scan.yaml",
            "transductive",
            (*TRANSDUCTIVE_3SPACES, "method.scan_epochs=75", "method.selflabel_epochs=50"),
        ),
        "turtle": Experiment(
            "turtle-transductive", "cifar10_spaces_turtle.yaml", (*TRANSDUCTIVE_3SPACES, "optim.epochs=500")
        ),
        "turtle-taps": Experiment(  # each backbone's last-block and head features: six spaces, the same passes' cost
            "turtle-transductive",
            "cifar10_spaces_turtle.yaml",
            (THREE_TAPPED, TRANSDUCTIVE, "optim.epochs=500"),
        ),
    },
    "cifar10_lite0": {
        "cc": Experiment("cc", "cifar10_lite0_cc.yaml"),
        **_cces_ablations("cifar10_lite0_cces.yaml"),
        **_short_budget({"cc": "cifar10_lite0_cc.yaml"}, _cces_ablations("cifar10_lite0_cces.yaml"), epochs=10),
        **_scan_rows("cifar10_lite0_scan.yaml"),
        **_scan_rows("cifar10_lite0_scan.yaml", "officialviews", OFFICIAL_VIEWS),
    },
}


def _method_row(experiment: Experiment, config: Any, metrics: dict[str, Any], seconds: float, seed: int) -> dict:
    """The fields every trained method's row shares (`docs/design.md`, results files): the protocol is
    (`train_split`, `split` = the evaluation split)."""
    return {
        "dataset": config.data.dataset,
        "train_split": config.data.train_split,
        "split": config.data.eval_split,
        "method": experiment.method,
        "backbone": config.model.backbone_name + ("-frozen" if config.model.freeze_backbone else ""),
        "acc": round(float(metrics["acc"]), 4),
        "nmi": round(float(metrics["nmi"]), 4),
        "ari": round(float(metrics["ari"]), 4),
        "seconds": seconds,
        "config": experiment.config,
        "overrides": list(experiment.overrides),
        "seed": seed,
    }


def with_protocol(experiment: Experiment, tag: str | None, overrides: list[str] | None) -> Experiment:
    """The experiment under a changed protocol (e.g. a training subset): the overrides are added and the row's method
    carries the tag, so its rows never replace the full protocol's."""
    if not overrides:
        return experiment
    return Experiment(
        f"{experiment.method}-{tag}", experiment.config, (*experiment.overrides, *overrides), dict(experiment.extra)
    )


def run_experiment(experiment: Experiment, out_dir: Path, seed: int) -> dict[str, Any]:
    """Train one row's config (any method, through the registry) and read its metrics; a staged method's row names
    its stage in `extra["stage"]` (both SCAN rows of a config share one run directory: the second only reads)."""
    from training.config import load_config
    from training.run import train

    stage = experiment.extra.get("stage")
    # The config's stem keeps suites apart (both have a "cc" entry); a staged method's rows share one run.
    suffix = (f"-{experiment.extra['run']}" if "run" in experiment.extra else "") if stage else f"-{experiment.method}"
    space = load_config(CONFIGS / experiment.config, list(experiment.overrides)).model.backbone_name
    name = f"{Path(experiment.config).stem}{suffix}-{space}-seed{seed}"
    overrides = [f"run.out_dir={out_dir}", f"run.name={name}", f"run.seed={seed}", *experiment.overrides]
    config = load_config(CONFIGS / experiment.config, overrides)
    started = time.perf_counter()
    summary = train(config)
    wall = time.perf_counter() - started
    if stage is None:
        run_dir = config.run_dir
        metrics = summary
        # Training time from the run's own log, so that a resumed run reports all of its epochs, not the last session.
        log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
        seconds = round(sum(float(r.get("seconds", 0.0)) for r in log) or wall, 1)
        extra = {"epochs": len(log)}
    else:
        run_dir = config.run_dir / stage
        if not (run_dir / "metrics.json").exists():
            raise RuntimeError(f"stage {stage!r} has no metrics (stopped: {summary.get('stopped')})")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        timings_path = config.run_dir / "bench_seconds.json"
        timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
        timings.update(summary["seconds"])  # stages that ran now; earlier ones are remembered from their run
        timings_path.write_text(json.dumps(timings))
        order = ["pretext", "mine", "scan", "selflabel"]
        upto = order[: order.index(stage) + 1]
        seconds = round(sum(timings.get(s, 0.0) for s in upto), 1) or round(wall, 1)
        extra = {
            "neighbour_k": summary.get("neighbour_k"),
            "neighbour_agreement_train": summary.get("neighbour_agreement"),
            "head_index": metrics.get("head_index", summary["head_index"]),
            "stage_seconds": {s: timings[s] for s in upto if s in timings},
            "stopped": summary.get("stopped"),
        }
    return {
        **_method_row(experiment, config, metrics, seconds, seed),
        "run_dir": str(run_dir),
        "extra": {**experiment.extra, **extra, "wall_seconds_this_session": round(wall, 1)},
    }


def kmeans_row(suite: str, seed: int) -> dict[str, Any]:
    """k-means (10 clusters) on the same inputs the methods see: raw pixels, or the frozen features."""
    from sklearn.cluster import KMeans

    from serving.core.quality import evaluate_clustering
    from training.config import load_config
    from training.data.datasets import create_dataset
    from training.trainer import Trainer

    started = time.perf_counter()
    if suite == "fashion_mnist":
        train, test = create_dataset("fashion_mnist", "train"), create_dataset("fashion_mnist", "test")
        x_train = train.images.reshape(len(train), -1).astype(np.float32) / 255.0
        x_test = test.images.reshape(len(test), -1).astype(np.float32) / 255.0
        y_test, backbone, dataset = test.labels, "raw-pixels", "fashion_mnist"
    else:
        config = load_config(CONFIGS / SUITES[suite]["cc"].config, ["run.out_dir=/tmp/deepclust-kmeans"])
        trainer = Trainer(config)
        x_train = trainer.cached_passes(trainer.train_set, ["clean"])[0]
        x_test = trainer.cached_passes(trainer.eval_set, ["clean"])[0]
        x_train = x_train / np.linalg.norm(x_train, axis=1, keepdims=True)
        x_test = x_test / np.linalg.norm(x_test, axis=1, keepdims=True)
        y_test, backbone, dataset = trainer.eval_set.labels, config.model.backbone_name + "-frozen", "cifar10"
    model = KMeans(n_clusters=10, n_init=10, random_state=seed).fit(x_train)
    report = evaluate_clustering(y_test, model.predict(x_test))
    return {
        "dataset": dataset,
        "split": "test",
        "method": "kmeans",
        "backbone": backbone,
        "acc": round(report.acc, 4),
        "nmi": round(report.nmi, 4),
        "ari": round(report.ari, 4),
        "seconds": round(time.perf_counter() - started, 1),
        "config": None,
        "overrides": [],
        "seed": seed,
        "extra": {"fit_on": "train", "n_init": 10},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), required=True)
    parser.add_argument("--only", nargs="*", help="methods of the suite to run (default: all, plus kmeans)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one row per seed (rows keyed by seed)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="protocol overrides for every row (with --tag)")
    parser.add_argument("--tag", help="suffix of the rows' method under --set (e.g. sub10k)")
    args = parser.parse_args(argv)
    if bool(args.set) != bool(args.tag):
        parser.error("--set and --tag go together: a changed protocol must be named in its rows")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    wanted = args.only or [*SUITES[args.suite], "kmeans"]
    unknown = [w for w in wanted if w != "kmeans" and w not in SUITES[args.suite]]
    if unknown:
        parser.error(f"unknown methods for {args.suite}: {unknown}; known: {sorted(SUITES[args.suite])}")
    rows = []
    for seed in args.seeds:
        for key in wanted:
            row = kmeans_row(args.suite, seed) if key == "kmeans" else None
            if row is None:
                row = run_experiment(with_protocol(SUITES[args.suite][key], args.tag, args.set), args.out_dir, seed)
            row.update(provenance())
            row["command"] = "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
            rows.append(row)
            write_rows("quality", [row], merge_on=("dataset", "method", "backbone", "seed"))
            print(json.dumps(row), flush=True)
    print_table(rows, ["dataset", "method", "backbone", "seed", "acc", "nmi", "ari", "seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
