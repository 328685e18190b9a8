"""`deepclust train DIR` end to end: inspect -> pick -> K -> size -> train (both candidates when unsure) -> keep one.

The decisions themselves are data and pure functions in `training.auto` (recipes, rules, sizing) and
`training.kselect` (K); this module runs them in order, trains through the one trainer (`training.run.train`, so
warnings and checkpoints are the same as with a config), and writes `auto.json` beside the result.

Label-free choice between candidates (a rule with several recipes): each candidate is trained with two seeds and
the one whose two runs agree most (adjusted Rand index between their assignments of the folder's images) is kept.
A recipe that finds real structure finds it again from another initialisation; one that fits noise does not.
Labels, when the folder has class sub-folders, are reported beside each candidate and never read by the choice.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.auto import (
    AUTO_RESERVE_SECONDS,
    AUTO_TARGET_SECONDS,
    DEFAULT_BUDGET,
    RECIPES,
    REFERENCE,
    Budget,
    Pick,
    Recipe,
    Sizing,
    Speeds,
    inspect_folder,
    measure_backbone,
    measure_step,
    pick,
    recipe_config,
    size,
    to_json,
)
from training.config import TrainConfig, apply_overrides
from training.kselect import KEstimate, estimate_k, write_evidence

log = logging.getLogger("deepclust.auto")

AUTO_FILE = "auto.json"
RUN_FILES = ("final.pt", "metrics.json", "config.yaml", "warnings.json", "log.jsonl")


@dataclass
class AutoOptions:
    """What the user may set; everything left None is chosen automatically."""

    folder: Path
    k: str | None = None  # None: class sub-folders if any, else estimated; "auto": estimated; "7": given
    budget: str = DEFAULT_BUDGET
    recipes: list[str] | None = None  # restrict/force the candidates (--recipe)
    method: str | None = None  # keep only candidates of this method (--method)
    name: str | None = None
    out_dir: str = "runs"
    seed: int = 0
    overrides: list[str] = field(default_factory=list)  # dotted key=value, applied last
    echo: Callable[[str], None] = print


def _clean_features(recipe: Recipe, folder: Path) -> np.ndarray:
    """The frozen recipe's clean cached pass of the folder (the same cache entry its training reads)."""
    from training.data.datasets import create_dataset
    from training.data.views import Clean
    from training.features import frozen_pass

    dataset = create_dataset("folder", "train", folder)
    return frozen_pass(recipe.backbone, dataset, Clean(int(recipe.image_size or 160)), 0, workers=2)


def passes_to_compute(recipe: Recipe, config: TrainConfig) -> int:
    """How many of a frozen recipe's feature passes of this folder are not in the cache yet (what the budget must
    still pay for: a re-run or a second recipe on the same folder reads them for free)."""
    import hashlib

    from training.data.datasets import create_dataset
    from training.data.views import Strong, data_augmentation, named_pass
    from training.features import feature_key
    from training.paths import cache_root

    if not recipe.frozen:
        return 0
    dataset = create_dataset("folder", "train", config.data.root)
    size = config.data.image_size
    strong = Strong(size, getattr(config.method, "cutout_fraction", 0.5))
    missing = 0
    for name in recipe.passes:
        view, seed = named_pass(name, size, data_augmentation(config.data), strong)
        input_size = int(np.asarray(dataset[0][0]).shape[0]) if isinstance(view, Strong) else size
        key = feature_key(recipe.backbone, True, dataset, view, seed, input_size)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        missing += not (cache_root() / "features" / f"{digest}.npy").exists()
    return missing


def choose_k(options: AutoOptions, facts: Any, run_dir: Path) -> tuple[int, dict[str, Any]]:
    """(K, how it was chosen). Estimation always runs on the frozen recipe's clean features (shared with it)."""
    if options.k not in (None, "auto"):
        k = int(options.k)  # type: ignore[arg-type]
        if k < 2:
            raise ValueError(f"--k must be >= 2 or 'auto', got {options.k}")
        return k, {"value": k, "source": "given (--k)", "estimated": None}
    if options.k is None and facts.labelled:
        return facts.classes, {
            "value": facts.classes,
            "source": "the folder's class sub-folders (use --k auto to estimate it without them)",
            "estimated": None,
        }
    frozen = next(r for r in RECIPES.values() if r.frozen)
    started = time.perf_counter()
    features = _clean_features(frozen, options.folder)
    extract = time.perf_counter() - started
    estimate: KEstimate = estimate_k(features, seed=options.seed)
    files = write_evidence(estimate, run_dir)
    info = {
        "value": estimate.k,
        "source": f"estimated without labels: {estimate.criterion}, {estimate.reason}",
        "estimated": estimate.k,
        "features": f"{frozen.backbone} clean pass at {frozen.image_size} px ({extract:.0f} s incl. extraction)",
        "evidence": [p.name for p in files],
        "structure_found": estimate.structure,
        "table": [
            {
                "k": r.k,
                "excess": r.excess,
                "excess_se": r.excess_se,
                "prediction_strength": r.prediction_strength,
                "null_prediction_strength": r.null_prediction_strength,
                "silhouette": r.silhouette,
            }
            for r in estimate.rows
        ],
        "k_raw_ps_rule_reported_not_used": estimate.k_raw_ps_rule,
        "seconds": estimate.seconds,
    }
    if facts.labelled:
        info["class_sub_folders_reported_not_used"] = facts.classes
    return estimate.k, info


def build_config(
    recipe: Recipe, options: AutoOptions, sizing: Sizing, out_dir: Path, name: str, seed: int
) -> TrainConfig:
    """Recipe fragment -> sizing overrides -> the user's overrides (last word), validated like any config."""
    data = recipe_config(recipe, options.folder, str(out_dir), name, seed)
    return TrainConfig.model_validate(apply_overrides(data, [*sizing.overrides, *options.overrides]))


def assignments(config: TrainConfig) -> np.ndarray:
    """Cluster of every image of the folder under the run's final weights (as evaluated: the serving resize)."""
    from training.trainer import Trainer, load_stage_weights

    trainer = Trainer(config)
    load_stage_weights(trainer.model, config.run_dir / "final.pt")
    probabilities, _, _ = trainer.predict()
    return probabilities.argmax(axis=1)


def measure(recipes: list[Recipe], configs: dict[str, TrainConfig], budget: Budget, facts: Any) -> Speeds:
    """Speeds for the budget: the reference machine's recorded ones for `auto` (deterministic), measured now for
    a wall-time budget (load-dependent), none for a steps budget."""
    if budget.auto:
        return REFERENCE.speeds(recipes, facts)
    if budget.seconds is None:
        return Speeds()
    rates = {r.backbone: round(measure_backbone(r.backbone, int(r.image_size or 160)), 1) for r in recipes if r.frozen}
    steps = {r.name: round(measure_step(configs[r.name]), 5) for r in recipes}
    return Speeds(backbone_images_per_s=rates, step_seconds=steps)


SELECTION_CRITERION = "adjusted Rand index between the assignments of two seeds of the same recipe (higher wins)"


def select_candidate(pairs: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[str, list[dict[str, Any]]]:
    """The recipe whose two seeds' assignments of the same images agree most (ARI; ties: the first listed).

    Only assignments enter: no labels can reach this choice."""
    from sklearn.metrics import adjusted_rand_score

    rows = [
        {"recipe": name, "seed_agreement_ari": round(float(adjusted_rand_score(a, b)), 4)}
        for name, (a, b) in pairs.items()
    ]
    best = max(rows, key=lambda r: r["seed_agreement_ari"])  # max keeps the first of equal values
    return best["recipe"], rows


def run_auto(options: AutoOptions) -> dict[str, Any]:
    """Train a model for `options.folder` with automatic choices; returns the summary also written to auto.json."""
    from training.run import train

    started = time.perf_counter()
    echo = options.echo
    folder = options.folder.resolve()
    options.folder = folder
    facts = inspect_folder(folder)
    chosen: Pick = pick(facts, options.recipes)
    names = [c for c in chosen.candidates if options.method is None or RECIPES[c].method == options.method]
    if not names:
        raise ValueError(f"no candidate recipe of method {options.method!r} among {chosen.candidates}")
    recipes = [RECIPES[n] for n in names]
    name = options.name or folder.name
    run_dir = Path(options.out_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    budget = Budget.parse(options.budget)
    echo(f"folder: {facts.describe()}")
    echo(f"rule: {chosen.rule} ({chosen.when}) -> {', '.join(names)}: {chosen.why}")

    k, k_info = choose_k(options, facts, run_dir)
    echo(
        f"K = {k}: {k_info['source']}"
        + (f" (evidence: {run_dir / 'k_selection.md'})" if k_info.get("evidence") else "")
    )
    if k_info.get("structure_found") is False:
        echo("WARNING (k): no K reproduces clearly better than structureless data; K is weakly supported (give --k)")

    unsure = len(recipes) > 1
    seeds = 2 if unsure else 1
    probe_sizing = {r.name: size(r, facts, k, Budget(steps=r.min_steps), Speeds()) for r in recipes}
    probe_configs = {
        r.name: build_config(r, options, probe_sizing[r.name], run_dir, "probe", options.seed) for r in recipes
    }
    speeds = measure(recipes, probe_configs, budget, facts)
    sizings: list[Sizing] = []
    # auto: a fixed plan (nothing measured now, every pass paid for), so the steps depend on the folder only
    spent = AUTO_RESERVE_SECONDS if budget.auto else time.perf_counter() - started
    for index, recipe in enumerate(recipes):
        last = index == len(recipes) - 1
        missing = None if budget.auto else passes_to_compute(recipe, probe_configs[recipe.name])
        sizing = size(
            recipe,
            facts,
            k,
            budget,
            speeds,
            seeds=seeds,
            share=1.0 if last else 0.5,
            spent_seconds=spent,
            passes_to_compute=missing,
        )
        spent += sizing.estimated_seconds
        sizings.append(sizing)
        epochs = ", ".join(f"{s} {e} epochs" for s, e in sizing.epochs.items())
        echo(
            f"budget {budget.describe()} -> {recipe.name}: {sizing.steps} steps ({epochs} of {sizing.steps_per_epoch} "
            f"steps), x{seeds} seed(s), ~{sizing.estimated_seconds:.0f} s estimated: {sizing.why}"
        )

    planned = sum(s.estimated_seconds for s in sizings) + (AUTO_RESERVE_SECONDS if budget.auto else 0.0)
    if budget.auto and planned > AUTO_TARGET_SECONDS:
        echo(
            f"note: this folder needs ~{planned / 60:.0f} min on the reference machine even at the recipes' fewest "
            f"steps (the frozen passes cost {len(RECIPES['frozen-scan'].passes)} x {facts.images:,} images)"
        )
    runs: dict[str, list[TrainConfig]] = {}
    results: dict[str, dict[str, Any]] = {}
    train_seconds: dict[str, float] = {}
    for recipe, sizing in zip(recipes, sizings, strict=True):
        for s in range(seeds):
            seed = options.seed + s
            if unsure:
                config = build_config(
                    recipe, options, sizing, run_dir / "candidates", f"{recipe.name}-seed{seed}", seed
                )
            else:
                config = build_config(recipe, options, sizing, Path(options.out_dir), name, seed)
            t0 = time.perf_counter()
            result = train(config)
            train_seconds[f"{recipe.name}-seed{seed}"] = round(time.perf_counter() - t0, 1)
            runs.setdefault(recipe.name, []).append(config)
            if s == 0:
                results[recipe.name] = result

    selection: dict[str, Any] | None = None
    winner = recipes[0].name
    if unsure:
        pairs = {r.name: (assignments(runs[r.name][0]), assignments(runs[r.name][1])) for r in recipes}
        winner, rows = select_candidate(pairs)
        for row in rows:
            if facts.labelled:
                row["acc_reported_not_used"] = results[row["recipe"]].get("acc")
            echo(f"candidate {row['recipe']}: agreement of two seeds (ARI) {row['seed_agreement_ari']:.3f}")
        selection = {"criterion": SELECTION_CRITERION, "candidates": rows, "chosen": winner}
        source = runs[winner][0].run_dir
        for file in RUN_FILES:
            if (source / file).exists():
                shutil.copyfile(source / file, run_dir / file)
        echo(f"kept {winner} (the more stable recipe); its seed-{options.seed} run is the result in {run_dir}")

    result = results[winner]
    recipe = RECIPES[winner]
    summary = {
        "folder": to_json(facts),
        "rule": {"name": chosen.rule, "when": chosen.when, "why": chosen.why, "candidates": list(names)},
        "recipe": {
            "name": recipe.name,
            "summary": recipe.summary,
            "method": recipe.method,
            "backbone": recipe.backbone + ("-frozen" if recipe.frozen else ""),
            "evidence": recipe.evidence,
        },
        "k": k_info,
        "budget": {
            "asked": options.budget,
            "meaning": budget.describe(),
            **budget.meaning(),
            "planned_seconds": round(planned, 1),
            "speeds_from": "reference machine (recorded)"
            if budget.auto
            else ("measured at start-up" if budget.seconds else "not used"),
        },
        "speeds": to_json(speeds),
        "sizing": to_json(sizings),
        "selection": selection,
        "user_overrides": options.overrides,
        "metrics": {m: result.get(m) for m in ("acc", "nmi", "ari", "n")},
        "warnings": result.get("warnings", []),
        "seconds": {"total": round(time.perf_counter() - started, 1), "train": train_seconds},
        "run_dir": str(run_dir),
        "command": " ".join(["deepclust", *sys.argv[1:]]) if sys.argv and "deepclust" in sys.argv[0] else None,
    }
    (run_dir / AUTO_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    log.info(json.dumps({"event": "auto_done", "recipe": winner, "k": k, "run_dir": str(run_dir)}))
    return {**result, "run_dir": str(run_dir), "auto": summary}
