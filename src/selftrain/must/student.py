"""``must-student``: one multi-task student learns every teacher's labels (Ghiasi et al. 2021).

Each step takes a joint batch, or one task's batch (``must.student.sampling``, :mod:`selftrain.must.data`), augments it once with the strength
``must.student.augment``, moving every dense label of every task with the image (one set of warps,
each task's targets through it, keypoints with their own flip pairs), runs the shared backbone once,
then each head on the images that have its task. The task losses, each the mean over those images of
the task's per-image loss, are combined by :class:`TaskLossWeights`:

``heuristic`` (the MuST default, DESIGN §4)
    ``w_i = (b_s * lr_i) / (b_i * lr_s)``: student batch size and learning rate ``b_s``, ``lr_s``
    (``must.student``), teacher ``i``'s ``b_i``, ``lr_i`` (the teacher's ``batch_size``/``lr``, else
    ``teach.batch_size``/``teach.optim.lr``, with which a ``train`` teacher was trained).
``normalized``
    Loss normalization across tasks, after Zoph et al. 2020: ``L = 1/T * sum_i (avg / avg_i) * L_i``,
    with ``avg_i`` the moving average of task ``i``'s loss and ``avg`` the mean of the averages, so
    every task pulls with the same scale whatever its loss' units.
``user``
    The teachers' ``weight``.

With every weight 1 the total is the plain sum of the task losses.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from selftrain.atomic import atomic_write_text
from selftrain.augment import BatchAugment, warp_targets
from selftrain.checkpoint import save_weights
from selftrain.config import Config
from selftrain.engine import Runtime, export_model, fit
from selftrain.must.data import MultiTaskRecords, TaskBatch, TaskSampler
from selftrain.must.label import store_dir
from selftrain.must.network import HeadSpec, MultiTaskNetwork, MultiTaskSpec, backbone_state, spec_dict
from selftrain.data import build_source
from selftrain.must.teachers import open_pool, teacher_task, teacher_weights
from selftrain.network import image_statistics
from selftrain.outputs import RunFolder
from selftrain.teach import read_done

log = logging.getLogger("selftrain.must")


def heuristic_weights(cfg: Config) -> dict[str, float]:
    """MuST's default task weights ``(b_s * lr_i) / (b_i * lr_s)`` (module docstring), per teacher name."""
    s = cfg.must.student
    weights = {}
    for t in cfg.must.teachers:
        b_i = t.batch_size or cfg.teach.batch_size
        lr_i = t.lr or cfg.teach.optim.lr
        weights[t.key] = (s.batch_size * lr_i) / (b_i * s.optim.lr)
    return weights


class TaskLossWeights(nn.Module):
    """Combines per-task losses: fixed weights (heuristic, user) or loss normalization across tasks.

    The moving averages are buffers, so a resumed run continues with the same scales.

    Example:
        >>> combine = TaskLossWeights(["a", "b"], "user", weights={"a": 1.0, "b": 0.5})
        >>> combine({"a": torch.tensor(2.0), "b": torch.tensor(4.0)}).item()
        4.0
    """

    def __init__(self, keys: list[str], mode: str, weights: dict[str, float] | None = None, decay: float = 0.99) -> None:
        super().__init__()
        if mode not in ("heuristic", "normalized", "user"):
            raise ValueError(f"unknown loss weighting {mode!r}; known: heuristic, normalized, user")
        if mode != "normalized" and (weights is None or set(weights) != set(keys)):
            raise ValueError(f"{mode} weighting needs one weight per task {keys}, got {weights}")
        self.keys, self.mode, self.decay = list(keys), mode, decay
        self.weights = dict(weights or {})
        self.register_buffer("average", torch.zeros(len(keys), dtype=torch.float64))
        self.register_buffer("count", torch.zeros(len(keys), dtype=torch.int64))

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """``{task: scalar loss}`` of the tasks in this step (a task may be absent) -> the total loss."""
        if not losses:
            raise ValueError("no task loss to combine")
        if self.mode != "normalized":
            return sum(self.weights[k] * loss for k, loss in losses.items())
        positions = [self.keys.index(k) for k in losses]
        if self.training:
            for i, loss in zip(positions, losses.values()):
                value = loss.detach().double()
                if self.count[i] == 0:
                    self.average[i] = value
                else:
                    self.average[i] = self.decay * self.average[i] + (1 - self.decay) * value
                self.count[i] += 1
        averages = self.average[positions].clamp_min(1e-12)
        scale = (averages.mean() / averages).to(next(iter(losses.values())).dtype)
        return sum(s * loss for s, loss in zip(scale, losses.values())) / len(losses)


def joint_augment(aug: BatchAugment, images: torch.Tensor, batch: dict[str, TaskBatch], tasks: dict):
    """Augments the images once and moves every dense target of every task with them.

    Returns the augmented images and ``{task: targets}`` in the order of ``batch[task].rows``.
    """
    images, warps = aug.forward_with_warps(images)
    out = {}
    size = (images.shape[-2], images.shape[-1])
    for key, part in batch.items():
        task = tasks[key]
        if not task.dense or not warps:
            out[key] = part.targets
            continue
        full: list[dict] = [{} for _ in range(len(images))]  # images without the task move nothing
        for row, target in zip(part.rows, part.targets):
            full[row] = target
        moved = warp_targets(full, [w.cpu() for w in warps], size, getattr(task, "flip_pairs", ()))
        out[key] = [moved[row] for row in part.rows]
    return images, out


def task_losses(net: MultiTaskNetwork, x: torch.Tensor, batch: dict[str, TaskBatch], targets: dict, tasks: dict, runtime: Runtime) -> dict[str, torch.Tensor]:
    """One backbone pass, each head on its images: ``{task: mean per-image loss}``."""
    with runtime.autocast():
        features = net.features(x)
    losses = {}
    for key, part in batch.items():
        task = tasks[key]
        rows = torch.as_tensor(part.rows, device=x.device)
        with runtime.autocast():
            outputs = net.head_outputs(key, features, rows)
        losses[key] = task.loss(outputs, task.to_device(task.batch_targets(targets[key]), runtime.device)).mean()
    return losses


def student_tasks(cfg: Config, run: RunFolder, pool) -> dict:
    """``{name: task}`` of the teachers, sized as at labeling time."""
    tasks = {}
    for i, tcfg in enumerate(cfg.must.teachers):
        where = f"must.teachers.{i}"
        path = teacher_weights(run, tcfg)
        if path is not None and not path.exists():
            raise FileNotFoundError(f"{path} is missing: run must-label first (it trains the teachers)")
        spec = json.loads(path.with_suffix(".json").read_text())["spec"] if path is not None else None
        data = build_source(tcfg.data, progress=False) if tcfg.data else None
        tasks[tcfg.key] = teacher_task(tcfg, pool, where, data=data, spec=spec)
    return tasks


def student_dir(run: RunFolder) -> Path:
    return run.root / "must" / "student"


def must_student(cfg: Config, run: RunFolder, runtime: Runtime, folder: Path | None = None) -> Path:
    """Trains (or reuses) the multi-task student; returns the path of its weights.

    It learns the tasks of ``cfg.must.teachers`` from the store and teachers of ``run``, and writes
    into ``folder`` (default ``OUT/must/student``); the transfer benchmark's single-task students
    are this with one teacher and a folder of their own.
    """
    folder = folder or student_dir(run)
    weights = folder / "model.safetensors"
    if read_done(folder) and weights.exists():
        log.info("must-student: already done in %s", folder)
        return weights
    s = cfg.must.student
    pool, _ = open_pool(cfg)
    tasks = student_tasks(cfg, run, pool)
    records = MultiTaskRecords(store_dir(run), tasks, {t.key: t.threshold for t in cfg.must.teachers})
    mean, std = image_statistics(pool.load_batch(records.index[: min(len(records), 2000)]))
    sample = pool.load_batch(records.index[:1])
    heads = [HeadSpec(k, t.name, int(t.num_classes)) for k, t in tasks.items()]
    spec = MultiTaskSpec(cfg.model.backbone, int(sample.shape[1]), int(sample.shape[-1]), mean, std, heads)
    torch.manual_seed(cfg.seed)  # the initial weights are part of what a seed fixes
    net = MultiTaskNetwork(spec, weights=None if s.init == "scratch" else s.init, tasks=tasks).to(runtime.device)
    if runtime.channels_last:
        net.to(memory_format=torch.channels_last)
    aug = BatchAugment(s.augment)
    sampler = TaskSampler(records, s.sampling, s.batch_size, cfg.seed + 7)
    fixed = heuristic_weights(cfg) if cfg.must.loss_weights == "heuristic" else {t.key: t.weight for t in cfg.must.teachers}
    combine = TaskLossWeights(list(tasks), cfg.must.loss_weights, None if cfg.must.loss_weights == "normalized" else fixed, s.average_decay)
    log.info("must-student: %d records (%s), loss weights %s", len(records), records.counts(),
             cfg.must.loss_weights if cfg.must.loss_weights == "normalized" else fixed)  # fmt: skip

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        chosen, batch = sampler(step)
        x, targets = joint_augment(aug, runtime.images(pool.load_batch(records.index[chosen])), batch, tasks)
        losses = task_losses(net, x, batch, targets, tasks, runtime)
        return {"loss": combine(losses), **{f"loss_{k}": v.detach() for k, v in losses.items()}}

    result = fit(net, step_fn, steps=s.steps, optim=s.optim, engine=cfg.engine, out_dir=folder, seed=cfg.seed,
                 desc="must-student", stateful={"loss_weights": combine})  # fmt: skip
    meta = {"spec": spec_dict(spec), "stage": "must-student", "seconds": result.seconds, "seed": cfg.seed,
            "loss_weights": cfg.must.loss_weights, "records": records.counts()}  # fmt: skip
    export_model(weights, net, meta)
    save_weights(folder / "backbone.safetensors", backbone_state(net), metadata={"backbone": cfg.model.backbone})
    done = {"seconds": result.seconds, "steps": s.steps, "records": records.counts(), "bad_steps": result.bad_steps}
    atomic_write_text(folder / "done.json", json.dumps(done))
    log.info("must-student: done in %.0f s -> %s", result.seconds, weights)
    return weights
