"""SCAN as a staged pipeline: pretext -> mine -> scan -> selflabel, all under one run directory.

    run_dir/
      config.yaml            the pipeline's config
      pretext/final.pt       SimCLR (skipped for a pretrained, frozen backbone)
      neighbours.npz         top-k neighbour indices + label agreement (plain numpy)
      scan/final.pt          SCAN clustering, `head_index` = lowest-loss head
      selflabel/final.pt     self-labelled model (or selflabel/collapse.json when the guard stopped it)
      final.pt, metrics.json the pipeline's result (a copy of the last successful stage), for export/evaluate

A stage whose artifact exists is skipped, so re-running the same command only runs what is missing; a stage that was
interrupted resumes from its own `last.pt` (the trainer's exact resume).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from training import distributed
from training.config import SCANConfig, TrainConfig
from training.methods.base import Method
from training.methods.scan import CollapseError, SCANClustering, SelfLabel, SimCLRPretext
from training.mining import NEIGHBOURS_FILE, Neighbours, mine
from training.trainer import CHECKPOINT_FINAL, CHECKPOINT_LAST, Trainer

log = logging.getLogger("deepclust.scan")

STAGES = ("pretext", "scan", "selflabel")
COLLAPSE_REPORT = "collapse.json"


class StageTrainer(Trainer):
    """The one trainer, with a given method object and the method's own training dataset when it has one."""

    def __init__(self, config: TrainConfig, method: Method) -> None:
        super().__init__(config)
        self.method = method
        if self.device_augment:
            self.batch_views = [v.to(self.device) for v in method.batch_views()]

    def train_dataset(self) -> Dataset:
        factory = getattr(self.method, "train_dataset", None)
        dataset = factory(self) if factory is not None else None
        return dataset if dataset is not None else super().train_dataset()

    def train_epoch(self, dataset: Dataset, epoch: int) -> dict[str, float]:
        losses = super().train_epoch(dataset, epoch)
        hook = getattr(self.method, "on_epoch_end", None)
        if hook is not None:
            hook(self, losses)  # may set model.head_index before the evaluation and checkpoint of this epoch
        return losses


def scan_settings(config: TrainConfig) -> SCANConfig:
    if not isinstance(config.method, SCANConfig):
        raise ValueError(f"the SCAN pipeline needs method.name=scan, got {config.method.name!r}")
    return config.method


def runs_pretext(config: TrainConfig) -> bool:
    s, m = scan_settings(config), config.model
    if s.pretext == "auto":
        return not (m.pretrained and m.freeze_backbone)
    if s.pretext == "simclr" and m.cached_features:
        raise ValueError("pretext=simclr cannot train a frozen, cached backbone; use pretext=skip or auto")
    return s.pretext == "simclr"


def stage_config(config: TrainConfig, stage: str) -> TrainConfig:
    """The trainer config of one stage: its own run directory, epochs and learning rate, same model."""
    s = scan_settings(config)
    epochs, lr = {
        "pretext": (s.pretext_epochs, s.pretext_lr),
        "scan": (s.scan_epochs, s.scan_lr),
        "selflabel": (max(s.selflabel_epochs, 1), s.selflabel_lr),
    }[stage]
    return config.model_copy(
        update={
            "run": config.run.model_copy(update={"out_dir": str(config.run_dir), "name": stage}),
            "optim": config.optim.model_copy(update={"epochs": epochs, "lr": lr}),
            "method": s.model_copy(update={"stage": stage}),
        }
    )


def load_stage_weights(trainer: Trainer, checkpoint: Path) -> None:
    """A stage checkpoint's weights and kept cluster head into the trainer's model."""
    state = torch.load(checkpoint, map_location=trainer.device, weights_only=True)
    trainer.model.load_state_dict(state["model"])
    trainer.model.head_index = int(state.get("head_index", 0))


def _start_from(trainer: Trainer, checkpoint: Path | None) -> None:
    """Initialise a fresh stage from the previous stage's weights (a resumed stage has its own last.pt)."""
    if checkpoint is None or (trainer.run_dir / CHECKPOINT_LAST).exists():
        return
    load_stage_weights(trainer, checkpoint)
    log.info(json.dumps({"event": "stage_init", "stage": trainer.run_dir.name, "from": str(checkpoint)}))


def mining_features(trainer: Trainer, source: str) -> np.ndarray:
    """Training-set embedding to mine: cached clean features, or a clean pass through the (pretext) network."""
    _, features, _ = trainer.predict(trainer.train_set)
    if source == "projection":
        with torch.inference_mode():
            trainer.model.eval()
            tensor = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(trainer.device)
            features = torch.cat([trainer.model.instance_head(c) for c in tensor.split(4096)]).cpu().numpy()
    return features


def _stage_metrics(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_scan_pipeline(config: TrainConfig) -> dict[str, Any]:
    """Run the missing stages; return the final metrics plus per-stage summaries and the neighbour agreement."""
    s = scan_settings(config)
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if distributed.is_main_process():
        (run_dir / "config.yaml").write_text(config.to_yaml())
    timings: dict[str, float] = {}
    # Under torchrun every rank walks the same stages: each "does this artifact exist?" below is asked after a barrier,
    # so that rank 0 writing an artifact never lets the ranks take different branches (DDP would then hang).
    distributed.barrier()

    # 1. pretext
    pretext_ckpt: Path | None = None
    if runs_pretext(config):
        cfg = stage_config(config, "pretext")
        pretext_ckpt = cfg.run_dir / CHECKPOINT_FINAL
        if not pretext_ckpt.exists():
            started = time.perf_counter()
            StageTrainer(cfg, SimCLRPretext(cfg)).fit()
            timings["pretext"] = time.perf_counter() - started

    # 2. mine
    neighbours_path = run_dir / NEIGHBOURS_FILE
    scan_cfg = stage_config(config, "scan")
    scan_trainer: StageTrainer | None = None
    distributed.barrier()
    if neighbours_path.exists():
        neighbours = Neighbours.load(neighbours_path)
        if neighbours.k != s.neighbours:
            raise ValueError(f"{neighbours_path} holds k={neighbours.k}, config asks {s.neighbours}; use a new run")
    else:
        started = time.perf_counter()
        source = s.mine_on if s.mine_on != "auto" else ("projection" if pretext_ckpt is not None else "backbone")
        scan_trainer = StageTrainer(scan_cfg, SCANClustering(scan_cfg))
        if pretext_ckpt is not None:
            load_stage_weights(scan_trainer, pretext_ckpt)
        labels = np.asarray(scan_trainer.train_set.labels)  # type: ignore[attr-defined]
        if distributed.is_main_process():  # mined once, shared through the file: every rank reads rank 0's result
            neighbours = mine(
                mining_features(scan_trainer, source), labels if (labels >= 0).all() else None, s.neighbours, source
            )
            neighbours.save(neighbours_path)
        distributed.barrier()
        neighbours = Neighbours.load(neighbours_path)
        timings["mine"] = time.perf_counter() - started
        log.info(
            json.dumps(
                {
                    "event": "mined",
                    "k": neighbours.k,
                    "agreement": neighbours.agreement,
                    "source": source,
                    "seconds": round(timings["mine"], 1),
                }
            )
        )

    # 3. scan
    scan_ckpt = scan_cfg.run_dir / CHECKPOINT_FINAL
    distributed.barrier()
    if not scan_ckpt.exists():
        started = time.perf_counter()
        method = SCANClustering(scan_cfg, neighbours.indices)
        if scan_trainer is None:
            scan_trainer = StageTrainer(scan_cfg, method)
        else:
            scan_trainer.method = method
            if scan_trainer.device_augment:
                scan_trainer.batch_views = [v.to(scan_trainer.device) for v in method.batch_views()]
        _start_from(scan_trainer, pretext_ckpt)
        scan_trainer.fit()
        timings["scan"] = time.perf_counter() - started
    final_ckpt, final_stage = scan_ckpt, "scan"

    # 4. selflabel
    collapse: dict[str, Any] | None = None
    if s.selflabel_epochs > 0:
        cfg = stage_config(config, "selflabel")
        ckpt, report = cfg.run_dir / CHECKPOINT_FINAL, cfg.run_dir / COLLAPSE_REPORT
        distributed.barrier()
        if report.exists():
            collapse = json.loads(report.read_text())
        elif not ckpt.exists():
            started = time.perf_counter()
            trainer = StageTrainer(cfg, SelfLabel(cfg))
            _start_from(trainer, scan_ckpt)
            try:
                trainer.fit()
            except CollapseError as error:  # raised on every rank alike: the guard sees the gathered assignments
                collapse = error.report()
                if distributed.is_main_process():
                    report.write_text(json.dumps(collapse, indent=2) + "\n")
                log.error(json.dumps({"event": "selflabel_collapse", **collapse}))
            timings["selflabel"] = time.perf_counter() - started
        if collapse is None:
            final_ckpt, final_stage = ckpt, "selflabel"

    # result: a copy of the last successful stage at the run root, for `deepclust export/evaluate <run_dir>`
    distributed.barrier()
    if distributed.is_main_process():
        tmp = run_dir / (CHECKPOINT_FINAL + ".tmp")
        shutil.copyfile(final_ckpt, tmp)
        tmp.replace(run_dir / CHECKPOINT_FINAL)
    stages = {stage: _stage_metrics(run_dir / stage) for stage in STAGES if (run_dir / stage).is_dir()}
    metrics = dict(stages[final_stage] or {})
    agreement = neighbours.agreement
    metrics.update(
        stage=final_stage,
        neighbour_k=neighbours.k,
        neighbour_agreement=None if math.isnan(agreement) else round(agreement, 4),
        stages={k: {m: v.get(m) for m in ("acc", "nmi", "ari")} if v else None for k, v in stages.items()},
        head_index=int(torch.load(final_ckpt, map_location="cpu", weights_only=True).get("head_index", 0)),
        selflabel_collapse=collapse,
        seconds={k: round(v, 1) for k, v in timings.items()},
    )
    if distributed.is_main_process():
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    distributed.barrier()
    return metrics
