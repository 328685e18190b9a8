"""The one trainer every method plugs into (torchvision-references style: a plain loop, no framework).

It runs the method's stages in order (one for CC and CCES; pretext -> mine -> cluster -> self-label for SCAN), each
with its own run directory, Adam optimiser and schedule, checkpoints every N epochs and at the end, and exact resume
inside any stage (model, optimiser, scheduler, RNG states, epoch, method state); seeds, a JSON-lines log, evaluation
with ACC/NMI/ARI, progress bars. On CUDA: bf16 autocast, channels_last, pinned memory; it runs unchanged on CPU.
Methods never see the trainer: hooks receive a `MethodContext`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from serving.core.quality import evaluate_clustering
from training import distributed
from training.config import TrainConfig
from training.data.datasets import base_and_index, create_dataset, fixed_subset, seed_worker
from training.data.views import (
    CachedPasses,
    MultiView,
    Recipe,
    Strong,
    apply_batched,
    cached_view_names,
    collate_rows,
    data_augmentation,
    eval_transform,
    named_pass,
)
from training.features import frozen_pass
from training.methods.base import (
    Batch,
    Method,
    MethodContext,
    Stage,
    StepStage,
    StopStage,
    create_method,
    method_class,
)
from training.models.backbones import MultiSpace, create_backbones, freeze
from training.models.heads import ClusteringModel

log = logging.getLogger("deepclust.train")

CHECKPOINT_LAST = "last.pt"
CHECKPOINT_FINAL = "final.pt"
STOPPED_REPORT = "stopped.json"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(config: TrainConfig) -> ClusteringModel:
    m = config.model
    backbone = create_backbones(m.backbone, pretrained=m.pretrained, stem=m.stem)
    if m.freeze_backbone:
        freeze(backbone, m.trainable_blocks)
    dims = backbone.space_dims
    return ClusteringModel(
        backbone,
        backbone.feature_dim,
        m.k,
        projection_dim=m.projection_dim,
        num_cluster_heads=m.num_cluster_heads,
        hidden_dim=m.hidden_dim,
        cluster_head=method_class(config.method.name).cluster_head(config, dims),
    )


class _MethodStep(nn.Module):
    """The model with the method's whole step (encode + loss) as its forward, so that DDP sees that step.

    The methods call `model.instance_head` / `model.cluster_head` directly; DDP only synchronises gradients of
    forwards that run through `DistributedDataParallel.forward`. Wrapping the model in this module and passing the
    step as a closure routes every method's forward through DDP without changing the methods.
    """

    def __init__(self, model: ClusteringModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, step: Any) -> dict[str, torch.Tensor]:
        return step()


@dataclass
class EvalResult:
    probabilities: np.ndarray
    embedding: np.ndarray
    labels: np.ndarray
    metrics: dict[str, Any]


class Trainer:
    """Runs a method's stages on one model. Per stage: `stage`, `run_dir`, `optimizer`, `scheduler`, `epoch`."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.device = distributed.device_for(resolve_device(config.run.device))
        self.distributed = distributed.is_distributed()
        self.is_main = distributed.is_main_process()
        self.world_size = distributed.get_world_size()
        if config.optim.batch_size % self.world_size:
            raise ValueError(
                f"optim.batch_size={config.optim.batch_size} (the global batch) must divide by the "
                f"{self.world_size} processes"
            )
        self.batch_size = config.optim.batch_size // self.world_size  # per process; the losses see the global one
        self.root_dir = config.run_dir
        self.root_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(config.run.seed)
        self.model = build_model(config).to(self.device)
        if config.run.channels_last and self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        if config.model.sync_batchnorm and self.distributed:
            if self.device.type != "cuda":
                raise ValueError(
                    "model.sync_batchnorm needs one GPU per process: torch's SyncBatchNorm has no CPU kernel"
                )
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.method: Method = create_method(config)
        d = config.data
        self.train_set = fixed_subset(create_dataset(d.dataset, d.train_split, d.root), d.subset, config.run.seed)
        self.eval_set = fixed_subset(
            create_dataset(d.dataset, d.eval_split, d.root), d.eval_subset, config.run.seed + 1
        )
        self.cached = config.model.cached_features
        self.device_augment = d.augment_on == "device" and not self.cached
        self._clean_cache: dict[int, np.ndarray] = {}
        self.ddp: nn.Module | None = None
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # find_unused_parameters: a method may leave heads out of its loss (SCAN self-labelling, SimCLR pretext)
            self.ddp = DistributedDataParallel(
                _MethodStep(self.model),
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        self.stages = self.method.stages()
        single = len(self.stages) == 1 and isinstance(self.stages[0], Stage) and not self.stages[0].name
        self.enter_stage(self.stages[0] if single else None)  # type: ignore[arg-type]

    # ---------------------------------------------------------------- stages
    def enter_stage(self, stage: Stage | None) -> None:
        """Make `stage` the current one: its run directory, method, optimiser and schedule (None: the run root)."""
        self.stage = stage
        self.run_dir = self.root_dir / stage.name if stage and stage.name else self.root_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.run_dir / "log.jsonl"
        self.epoch = 0
        self.epochs = stage.epochs if stage else (self.config.optim.epochs or 1)
        stage_method = stage.method if stage else self.method
        self.batch_views = [r.batched().to(self.device) for r in stage_method.views()] if self.device_augment else []
        params = [p for p in self.model.parameters() if p.requires_grad]
        lr = stage.lr if stage else (self.config.optim.lr or 1e-3)  # no stage: nothing trains with it
        decay = stage.weight_decay if stage and stage.weight_decay is not None else self.config.optim.weight_decay
        self.schedule = (stage.schedule if stage else None) or self.config.optim.schedule
        if stage is not None and stage.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=lr, momentum=stage.momentum, weight_decay=decay)
        else:
            self.optimizer = torch.optim.Adam(params, lr=lr, weight_decay=decay)
        self.steps_per_epoch = self._steps_per_epoch()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    @property
    def stage_method(self) -> Method:
        return self.stage.method if self.stage is not None else self.method

    def context(self) -> MethodContext:
        return MethodContext(
            config=self.config,
            model=self.model,
            device=self.device,
            train_set=self.train_set,
            eval_set=self.eval_set,
            cached=self.cached,
            run_dir=self.run_dir,
            autocast=self.autocast,
            passes=self.cached_passes,
            transforms=self.sample_transforms,
            predict=self.predict,
        )

    # ---------------------------------------------------------------- data
    def _steps_per_epoch(self) -> int:
        steps = len(self.train_set) // self.world_size // self.batch_size
        if self.config.run.max_steps_per_epoch:
            steps = min(steps, self.config.run.max_steps_per_epoch)
        return max(steps, 1)

    def _lr_factor(self, step: int) -> float:
        o = self.config.optim
        warmup = o.warmup_epochs * self.steps_per_epoch
        if warmup and step < warmup:
            return (step + 1) / warmup
        if self.schedule == "cosine":
            total = max(self.epochs * self.steps_per_epoch - warmup, 1)
            return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total) / total))
        return 1.0

    def cached_passes(self, dataset: Dataset, names: Sequence[str], strong: Strong | None = None) -> list[np.ndarray]:
        """Named frozen-backbone feature passes of `dataset` ("clean", "augI", "strongI"; see `training.data.views`).
        With several backbones each space is cached on its own (shared by every combination) and combined here."""
        base, index = base_and_index(dataset)
        d, m = self.config.data, self.config.model
        backbone = self.model.backbone
        multi = isinstance(backbone, MultiSpace)
        name0 = m.backbone if isinstance(m.backbone, str) else m.backbone[0]
        spaces = list(zip(backbone.names, backbone.parts, strict=True)) if multi else [(name0, backbone)]
        augment = data_augmentation(d)
        out = []
        for name in names:
            recipe, seed = named_pass(name, d.image_size, augment, strong)
            features = [
                frozen_pass(
                    space,
                    base,
                    recipe,
                    seed,
                    pretrained=m.pretrained,
                    backbone=module,
                    workers=d.workers,
                    device=self.device,
                )
                for space, module in spaces
            ]
            full = MultiSpace.combine([torch.from_numpy(f) for f in features]).numpy() if multi else features[0]
            out.append(full if index is None else full[index])
        return out

    def train_data(self, ctx: MethodContext) -> Dataset:
        """The stage method's own dataset, or its views on the configured data path."""
        method = self.stage_method
        own = method.train_data(ctx)
        if own is not None:
            return own
        if self.cached:
            names = cached_view_names(self.config.model.feature_views)
            return CachedPasses(self.cached_passes(self.train_set, names), ctx.train_labels)
        transforms = self.sample_transforms(method.views())
        return MultiView(self.train_set, transforms[:1] if self.device_augment else transforms)

    def sample_transforms(self, recipes: Sequence[Recipe]) -> list[Callable[..., torch.Tensor]]:
        """Per-sample transforms of `recipes` on this run's image path: the recipes themselves in loader workers, or
        the clean view when the recipes run batched on the device (`train_epoch` applies them there)."""
        if self.device_augment:
            return [eval_transform(self.config.data.image_size) for _ in recipes]
        return [r.per_image() for r in recipes]

    def loader(self, dataset: Dataset, epoch: int, shuffle: bool = True, batch_size: int | None = None) -> DataLoader:
        # A generator seeded by (seed, epoch) makes every epoch's order and augmentations reproducible, so resuming
        # at an epoch boundary is exact.
        generator = torch.Generator().manual_seed(self.config.run.seed * 100_003 + epoch)
        workers = 0 if self.cached else self.config.data.workers
        sampler = None
        if shuffle and self.distributed:
            # Each rank takes every N-th sample of one permutation seeded by (seed, epoch): disjoint, equal-sized
            # shards whose union is the global batch. Worker seeds come from a per-rank generator.
            from torch.utils.data.distributed import DistributedSampler

            sampler = DistributedSampler(dataset, shuffle=True, seed=self.config.run.seed * 100_003, drop_last=True)
            sampler.set_epoch(epoch)
            generator = torch.Generator().manual_seed(distributed.rank_seed(self.config.run.seed, epoch))
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            drop_last=shuffle,
            num_workers=workers,
            generator=generator,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            worker_init_fn=seed_worker,
            collate_fn=collate_rows if getattr(dataset, "batchable", False) else None,
        )

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.cached:
            return inputs
        if self.config.run.channels_last and self.device.type == "cuda":
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return self.model.backbone(inputs)

    def autocast(self) -> torch.autocast:
        precision = self.config.run.precision
        enabled = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    # ---------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        """Run every stage that is not done yet. Distributed: rank 0 alone evaluates, logs and writes checkpoints
        and artifacts while the others wait at a barrier; every rank returns rank 0's metrics."""
        stages = self.stages
        if self.stage is not None and stages == [self.stage]:  # single-stage method, entered at construction
            return self.fit_stage()
        if self.is_main:
            (self.root_dir / "config.yaml").write_text(self.config.to_yaml())
        timings: dict[str, float] = {}
        finished: Path | None = None
        stage_metrics: dict[str, Any] = {}
        stopped: dict[str, Any] | None = None
        for stage in stages:
            # Every "is this stage done?" is asked after a barrier, so ranks never take different branches.
            distributed.barrier()
            started = time.perf_counter()
            if isinstance(stage, StepStage):
                path = self.root_dir / stage.artifact
                self.enter_stage(None)
                ctx = self.context()
                if not path.exists():
                    if self.is_main:
                        stage.compute(ctx, path)
                    timings[stage.name] = time.perf_counter() - started
                distributed.barrier()
                stage.load(ctx, path)
                continue
            self.enter_stage(stage)
            final, report = self.run_dir / CHECKPOINT_FINAL, self.run_dir / STOPPED_REPORT
            if report.exists():
                stopped = json.loads(report.read_text())
                break
            if final.exists():
                load_stage_weights(self.model, final)
            else:
                try:
                    self.fit_stage()
                except StopStage as stop:  # raised on every rank alike: hooks see the gathered batch
                    stopped = {"stage": stage.name, **stop.report()}
                    if self.is_main:
                        report.write_text(json.dumps(stopped, indent=2) + "\n")
                    log.error(json.dumps({"event": "stage_stopped", **stopped}))
                    timings[stage.name] = time.perf_counter() - started
                    break
                timings[stage.name] = time.perf_counter() - started
            finished = final
            stage_metrics[stage.name] = _read_metrics(self.run_dir)
        if finished is None:
            raise RuntimeError(f"no stage of {self.config.method.name!r} finished: {stopped}")
        load_stage_weights(self.model, finished)  # the result is the last finished stage, whatever ran after it
        self.enter_stage(None)
        last = finished.parent.name
        metrics = dict(stage_metrics[last] or {})
        metrics.update(
            stage=last,
            stages={k: {m: v.get(m) for m in ("acc", "nmi", "ari")} if v else None for k, v in stage_metrics.items()},
            head_index=int(self.model.head_index),
            stopped=stopped,
            seconds={k: round(v, 1) for k, v in timings.items()},
            **self.method.summary(self.context()),
        )
        distributed.barrier()
        if self.is_main:  # a copy of the result at the run root, for `deepclust export/evaluate <run_dir>`
            tmp = self.root_dir / (CHECKPOINT_FINAL + ".tmp")
            shutil.copyfile(finished, tmp)
            tmp.replace(self.root_dir / CHECKPOINT_FINAL)
            (self.root_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        distributed.barrier()
        return metrics

    def fit_stage(self) -> dict[str, Any]:
        """Train the current stage to its epochs, resuming from its `last.pt`. Each stage starts from the run's seed,
        so its random stream does not depend on whether earlier stages ran in this process or were loaded."""
        seed_everything(self.config.run.seed)
        self.resume()
        ctx = self.context()
        method = self.stage_method
        with distributed.main_process_first():  # rank 0 fills feature caches, the others then read them
            dataset = self.train_data(ctx)
        metrics: dict[str, Any] = {}
        for epoch in range(self.epoch, self.epochs):
            if self.distributed:  # per-rank streams derived from (seed, rank, epoch): resume needs no saved state
                seed_everything(distributed.rank_seed(self.config.run.seed, epoch))
            if self.cached:  # hooks may fill feature caches (CCES's ContrastiveCrop pass): rank 0 first
                with distributed.main_process_first():
                    method.on_epoch_start(ctx, epoch)
            else:  # e.g. CCES's heat maps of a trained backbone: every rank in parallel
                method.on_epoch_start(ctx, epoch)
            started = time.perf_counter()
            losses = self.train_epoch(dataset, epoch)
            method.on_epoch_end(ctx, epoch, losses)  # may set model.head_index before evaluation and checkpoint
            self.epoch = epoch + 1
            record: dict[str, Any] = {"epoch": self.epoch, "seconds": round(time.perf_counter() - started, 2), **losses}
            last = self.epoch == self.epochs
            if self.is_main and (last or self.epoch % self.config.run.eval_every == 0):
                metrics = self.evaluate().metrics
                record.update({k: metrics[k] for k in ("acc", "nmi", "ari")})
            if self.is_main:
                self._log(record)
            if self.is_main and (last or self.epoch % self.config.run.checkpoint_every == 0):
                self.save(CHECKPOINT_LAST)
            distributed.barrier()
        if self.is_main:
            self.save(CHECKPOINT_FINAL)
            if not metrics:
                metrics = self.evaluate().metrics
            (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        distributed.barrier()
        return distributed.broadcast_object(metrics)

    def train_epoch(self, dataset: Dataset, epoch: int) -> dict[str, float]:
        self.model.train()
        if self.config.model.freeze_backbone:
            self.model.backbone.eval()  # frozen BN statistics stay as pretrained
        method = self.stage_method
        totals: dict[str, float] = {}
        steps = 0
        bar = tqdm(
            total=self.steps_per_epoch,
            desc=f"{self.stage.name + ' ' if self.stage and self.stage.name else ''}epoch {epoch + 1}/{self.epochs}",
            leave=False,
            mininterval=1,
            dynamic_ncols=True,
            disable=not self.is_main,
        )
        for *views, labels, indices in self.loader(dataset, epoch):
            views = [v.to(self.device, non_blocking=True) for v in views]
            if self.device_augment:
                views = apply_batched(self.batch_views, views, indices)
            with self.autocast():
                if self.ddp is not None:
                    losses, batch = self.distributed_step(views, indices, labels)
                else:
                    batch = Batch([self.encode(v) for v in views], indices.to(self.device), labels)
                    losses = method.loss(self.model, batch)
            self.optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            self.optimizer.step()
            self.scheduler.step()
            method.on_step_end(batch)
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach())
            steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(losses['loss'].detach()):.3f}", refresh=False)
            if steps >= self.steps_per_epoch:
                break
        bar.close()
        return {key: round(value / max(steps, 1), 5) for key, value in totals.items()}

    def distributed_step(
        self, views: list[torch.Tensor], indices: torch.Tensor, labels: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], Batch]:
        """One step's losses on the GLOBAL batch, through DDP.

        Each rank encodes its own shard; the backbone features of every view are all-gathered with autograd, so the
        method computes the same global loss on every rank (N x B samples = one process with N*B). The heads are
        per-sample maps without BatchNorm, so heads on gathered features equal gathered projections and assignments,
        and every method (CC, CCES's support set, SCAN's entropy) sees the global batch unchanged. Gradient scale:
        see `training.distributed` — the gather's backward sums over ranks and DDP averages, which gives exactly the
        single-process gradient.
        """
        assert self.ddp is not None
        kept: list[Batch] = []
        method = self.stage_method

        def step() -> dict[str, torch.Tensor]:
            local = [self.encode(v) for v in views]
            batch = Batch(
                [distributed.gather_with_grad(f) for f in local],
                distributed.gather(indices.to(self.device)),
                distributed.gather(labels),
            )
            kept.append(batch)
            return method.loss(self.model, batch)

        losses = self.ddp(step)
        return losses, kept[0]

    # ---------------------------------------------------------------- evaluation
    @torch.inference_mode()
    def predict(self, dataset: Dataset | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(probabilities, embedding, labels) on the evaluation set (or the given one) with the serving
        pre-processing; with cached frozen features, from the cached clean pass."""
        dataset = dataset if dataset is not None else self.eval_set
        self.model.eval()
        labels = np.asarray(dataset.labels)  # type: ignore[attr-defined]
        if self.cached:
            features = self._clean_features(dataset)
            embedding = torch.from_numpy(features).to(self.device)
            probabilities = torch.cat([self.model.cluster_head(chunk) for chunk in embedding.split(4096)])
            return probabilities.float().cpu().numpy(), features, labels
        view = MultiView(dataset, [eval_transform(self.config.data.image_size)])
        probs, feats = [], []
        for images, _, _ in self.loader(view, 0, shuffle=False, batch_size=256):
            with self.autocast():
                p, h = self.model(images.to(self.device))
            probs.append(p.float().cpu())
            feats.append(h.float().cpu())
        return torch.cat(probs).numpy(), torch.cat(feats).numpy(), labels

    def _clean_features(self, dataset: Dataset) -> np.ndarray:
        """Cached clean-pass features, kept in memory per dataset (the evaluation set is read every few epochs)."""
        key = id(dataset)
        if key not in self._clean_cache:
            self._clean_cache[key] = self.cached_passes(dataset, ["clean"])[0]
        return self._clean_cache[key]

    def evaluate(self) -> EvalResult:
        probabilities, embedding, labels = self.predict()
        clusters = probabilities.argmax(axis=1)
        metrics: dict[str, Any] = {
            "dataset": self.config.data.dataset,
            "split": self.config.data.eval_split,
            "train_split": self.config.data.train_split,
            "n": int(len(clusters)),
        }
        if (labels >= 0).all():
            report = evaluate_clustering(labels, clusters)
            metrics.update(
                acc=report.acc,
                nmi=report.nmi,
                ari=report.ari,
                cluster_sizes=report.cluster_sizes,
                cluster_purity=report.cluster_purity,
                mapping=report.mapping,
                confusion=report.confusion,
            )
        else:
            counts = np.bincount(clusters, minlength=self.model.k)
            metrics.update(acc=None, nmi=None, ari=None, cluster_sizes={i: int(c) for i, c in enumerate(counts) if c})
        return EvalResult(probabilities, embedding, labels, metrics)

    # ---------------------------------------------------------------- checkpoints
    def save(self, name: str) -> Path:
        state = {
            "format": 1,
            "stage": self.stage.name if self.stage else "",
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "head_index": self.model.head_index,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "method": self.stage_method.state_dict(),
            "rng": _rng_state(),
            "config": self.config.model_dump(mode="json"),
        }
        path = self.run_dir / name
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)  # atomic: a kill never leaves a torn checkpoint
        (self.root_dir / "config.yaml").write_text(self.config.to_yaml())
        return path

    def resume(self) -> bool:
        path = self.run_dir / CHECKPOINT_LAST
        if not path.exists():
            if self.is_main:
                (self.root_dir / "config.yaml").write_text(self.config.to_yaml())
            return False
        state = torch.load(path, map_location=self.device, weights_only=True)  # every rank: the same checkpoint
        saved = state["config"]
        if _architecture(saved["model"]) != _architecture(self.config.model.model_dump(mode="json")):
            raise ValueError(f"{path} was trained with a different model config; use a new run name")
        self.model.load_state_dict(state["model"])
        self.model.head_index = int(state.get("head_index", 0))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stage_method.load_state_dict(state["method"])
        _set_rng_state(state["rng"])
        self.epoch = int(state["epoch"])
        log.info("resumed %s at epoch %d", path, self.epoch)
        return True

    def _log(self, record: dict[str, Any]) -> None:
        record = {"time": time.time(), "method": self.config.method.name, **record}
        if self.stage and self.stage.name:
            record["stage"] = self.stage.name
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        log.info(json.dumps(record))


def _read_metrics(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else None


def load_stage_weights(model: ClusteringModel, checkpoint: Path) -> None:
    """A checkpoint's weights and kept cluster head into `model` (a finished stage, or the start of the next)."""
    state = torch.load(checkpoint, map_location=next(model.parameters()).device, weights_only=True)
    model.load_state_dict(state["model"])
    model.head_index = int(state.get("head_index", 0))


def _architecture(model_config: dict[str, Any]) -> dict[str, Any]:
    """The model config minus how it is trained across processes (SyncBatchNorm may change on resume)."""
    return {k: v for k, v in model_config.items() if k != "sync_batchnorm"}


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[ClusteringModel, TrainConfig, dict]:
    """Rebuild the model of a checkpoint (weights_only: a checkpoint never executes code when loaded)."""
    state = torch.load(Path(path), map_location=map_location, weights_only=True)
    config = TrainConfig.model_validate(state["config"])
    model = build_model(config)
    model.load_state_dict(state["model"])
    model.head_index = int(state.get("head_index", 0))
    model.eval()
    return model, config, state


def resolve_checkpoint(run_or_checkpoint: str | Path) -> Path:
    path = Path(run_or_checkpoint)
    if path.is_dir():
        for name in (CHECKPOINT_FINAL, CHECKPOINT_LAST):
            if (path / name).exists():
                return path / name
        raise FileNotFoundError(f"no checkpoint ({CHECKPOINT_FINAL} or {CHECKPOINT_LAST}) in {path}")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
