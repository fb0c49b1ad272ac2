"""``teach``: supervised training of a teacher on the labeled split.

This is also the ``supervised`` baseline that self-training is measured against.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from selftrain.augment import BatchAugment
from selftrain.atomic import atomic_write_text
from selftrain.config import Config
from selftrain.engine import BatchIndices, FitResult, Runtime, export_model, fit
from selftrain.network import Network, NetworkSpec, image_statistics, load_network
from selftrain.outputs import RunFolder, read_done
from selftrain.pretrain import resolve_weights
from selftrain.tasks import build_task

log = logging.getLogger("selftrain.teach")


def network_spec(cfg: Config, data) -> NetworkSpec:
    """The spec of every network of a run; normalization statistics come from the labeled split."""
    sample = data.labeled_idx[: min(len(data.labeled_idx), 2000)]
    mean, std = image_statistics(data.labeled.load_batch(sample))
    return NetworkSpec(
        backbone=cfg.model.backbone, num_classes=build_task(cfg.task, data.labeled).num_classes, channels=data.channels,
        image_size=data.image_size, mean=mean, std=std, classes=list(data.classes), task=cfg.task,
    )  # fmt: skip


def train_supervised(
    net: Network, cfg: Config, data, runtime: Runtime, folder: Path, *, steps: int, batch_size: int, augment: str,
    optim, desc: str, seed: int, label_smoothing: float = 0.0, freeze_backbone: bool = False,
) -> FitResult:  # fmt: skip
    """Trains ``net`` on the labeled split (its head only with ``freeze_backbone``); returns the loop's result
    (seconds, skipped steps).

    Under torchrun each rank trains on its share of every batch of ``batch_size`` (the global batch).
    """
    task = build_task(cfg.task, data.labeled)
    params = net.freeze_backbone() if freeze_backbone else None
    aug = BatchAugment(augment)
    batches = BatchIndices(len(data.labeled_idx), batch_size, seed, runtime.ranks, what=f"{desc}: the batch size")
    net.to(runtime.device)
    if runtime.channels_last:
        net.to(memory_format=torch.channels_last)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        idx = data.labeled_idx[batches(step).numpy()]
        target = task.to_device(task.load_targets(data.labeled, idx, label_smoothing), runtime.device)
        x, target = task.augment(aug, runtime.images(data.labeled.load_batch(idx)), target)
        with runtime.autocast():
            outputs = net(x)
        return {"loss": task.loss(outputs, target).mean()}

    return fit(net, step_fn, steps=steps, optim=optim, engine=cfg.engine, out_dir=folder, seed=seed, desc=desc, params=params)


def teach(cfg: Config, run: RunFolder, data, runtime: Runtime) -> Path:
    """Trains (or reuses a finished) teacher and returns the path of its weights."""
    folder = run.stage("teach")
    weights = folder / "model.safetensors"
    if read_done(folder) and weights.exists():
        log.info("teach: already done in %s", folder)
        return weights
    spec = network_spec(cfg, data)
    torch.manual_seed(cfg.seed)  # the initial weights are part of what a seed fixes
    net = Network(spec, drop_rate=cfg.model.drop_rate, weights=resolve_weights(cfg, run))
    t = cfg.teach
    result = train_supervised(
        net, cfg, data, runtime, folder, steps=t.steps, batch_size=t.batch_size, augment=t.augment,
        optim=t.optim, desc="teach", seed=cfg.seed, label_smoothing=t.label_smoothing, freeze_backbone=t.freeze_backbone,
    )  # fmt: skip
    meta = {"spec": spec.__dict__, "stage": "teach", "round": 0, "seconds": result.seconds, "seed": cfg.seed}
    ranks = runtime.ranks
    if ranks.rank == 0:
        export_model(weights, net, meta)
        done = {"seconds": result.seconds, "steps": t.steps, "bad_steps": result.bad_steps}
        atomic_write_text(folder / "done.json", json.dumps(done))
    ranks.barrier()  # no rank reads the teacher (label) before rank 0 has written it
    log.info("teach: done in %.0f s -> %s", result.seconds, weights)
    return weights


def teacher_for_round(run: RunFolder, round_: int) -> Path:
    """Round 1 is labeled by the teacher, round r > 1 by the student of round r - 1."""
    if round_ == 1:
        path = run.root / "teach" / "model.safetensors"
    else:
        path = run.root / "student" / f"round-{round_ - 1}" / "model.safetensors"
    if not path.exists():
        stage = "teach" if round_ == 1 else f"student (round {round_ - 1})"
        raise FileNotFoundError(f"{path} is missing: run the {stage} stage first")
    return path


__all__ = ["teach", "train_supervised", "network_spec", "teacher_for_round", "load_network", "read_done"]
