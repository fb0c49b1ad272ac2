"""``student``: learns from human and pseudo labels with strong augmentation.

Following Zoph et al. 2020 and Noisy Student (Xie et al. 2020): the teacher labeled clean
images; the student sees strongly augmented ones (S1-S4), has dropout, and every step mixes
a batch of human-labeled images with a batch of pseudo-labeled ones. The two losses are
combined with loss normalization (or a plain weighted sum). The student starts from scratch,
from the teacher, or from any checkpoint; with ``student.rounds > 1`` it becomes the teacher
of the next round.

For classification the student can also teach itself while it learns (``student.consistency``,
FixMatch of Sohn et al. 2020): its own confident predictions on the clean pool images are hard
labels for strongly augmented views of them. With ``student.alpha_final: 0`` the teacher's
labels fade out on a cosine, so the student leans on the teacher first and on its own, by then
better, labels last: the student is no longer bound to its teacher's mistakes, which is what
held it within a point of its pseudo labels' accuracy without the term. ``student.pool_augment``
gives the pool images their own, stronger view (Noisy Student's strong noise on the pseudo
labels only); with the consistency term and no ``consistency_augment`` that one view carries
both the teacher's labels and the student's own, which costs one forward-backward pass less per
step than a second view. For segmentation the term works per pixel: the student's confident
pixels on the clean pool images label a new view, made by ``consistency_augment`` (else
``pool_augment``) with the self-label masks moved by its geometry. ``student.ema`` exports an
exponential moving average of the weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from selftrain.augment import BatchAugment
from selftrain.atomic import atomic_write_text
from selftrain.checkpoint import read_state_dict
from selftrain.config import Config
from selftrain.data.targets import IGNORE_INDEX
from selftrain.engine import BatchIndices, Runtime, export_model, fit
from selftrain.losses import (
    AdaptiveThreshold,
    ClassBalance,
    DistributionAlignment,
    LossNormalization,
    cosine_weight,
    self_label_loss,
)
from selftrain.network import Network
from selftrain.outputs import RunFolder
from selftrain.pretrain import resolve_weights
from selftrain.store import PseudoLabelStore
from selftrain.tasks import build_task
from selftrain.teach import network_spec, read_done, teacher_for_round

log = logging.getLogger("selftrain.student")


def pseudo_records(store_dir: Path, task):
    """The selected store records, repeats expanded: pool source indices (N,) and their targets.

    The targets are indexed by batch positions: a (N, K) tensor of distributions for
    classification, a :class:`~selftrain.tasks.dense.PseudoTargets` (decoded per batch) for a dense task.
    """
    store = PseudoLabelStore(store_dir)
    if not store.complete:
        raise FileNotFoundError(f"{store_dir}: the pseudo-label store is incomplete; run (or resume) the label stage")
    table = store.read(columns=["index", *task.pseudo_column_names()])
    selection = store.selection_rows()
    rows = np.arange(table.num_rows) if selection is None else np.repeat(*selection)
    if len(rows) == 0:
        raise ValueError(f"{store_dir}: no pseudo label passed the filter (label.threshold too high?)")
    index = table.column("index").to_numpy()[rows]
    targets = task.decode_pseudo(table.take(rows))
    return index, targets


def _initial_weights(net: Network, init: str, run: RunFolder, round_: int) -> None:
    if init in ("scratch", "random"):
        return
    path = teacher_for_round(run, round_) if init == "teacher" else Path(init)
    net.load_state_dict(read_state_dict(path), strict=init == "teacher")
    log.info("student: initialized from %s", path)


def _clean_predictions(net, clean, runtime: Runtime) -> torch.Tensor:
    """The student's outputs on the clean pool images that its self-labels come from: eval mode
    (no dropout noise, no batch-norm update) and no gradient."""
    was_training = net.training
    net.eval()
    with torch.no_grad(), runtime.autocast():
        outputs = net(clean)
    net.train(was_training)
    return outputs


def _consistency(net, clean, view_logits, strong, erase, runtime: Runtime, threshold, align=None, balance=None):
    """The FixMatch term on the pool batch: self-labels from the clean images, in eval mode (no
    dropout noise, no batch-norm update), distribution-aligned with ``align`` and class-balanced
    with ``balance``, for ``view_logits`` or, with ``strong``, a new view (erased by ``erase``)."""
    clean_logits = _clean_predictions(net, clean, runtime)
    if strong is not None:
        view = strong(clean)
        if erase is not None:
            view = erase(view)
        with runtime.autocast():
            view_logits = net(view)
    return self_label_loss(view_logits, clean_logits, threshold, align, balance)


def _mask_consistency(net, task, clean, view_aug, erase, runtime: Runtime, threshold: float):
    """The FixMatch term for segmentation (as in semi-supervised segmentation, e.g. UniMatch): the
    student's own pixels on the clean pool images, in eval mode, that reach ``threshold`` are hard
    labels; ``view_aug`` makes a new view and moves those masks with its geometry (unkept pixels
    and padding are ignored). ``mean_pixels 1[kept] * CE``, over all pixels, and the kept fraction."""
    clean_logits = _clean_predictions(net, clean, runtime)
    targets = task.to_device(task.encode_pseudo(clean_logits, threshold=threshold), runtime.device)
    view, targets = task.augment(view_aug, clean, targets)
    if erase is not None:
        view = erase(view)
    with runtime.autocast():
        logits = net(view)
    mask = torch.stack([t["mask"] for t in targets]).long()
    pixel = F.cross_entropy(logits.float(), mask, ignore_index=IGNORE_INDEX, reduction="none")
    return pixel.mean(), (mask != IGNORE_INDEX).float().mean()


def _eraser(p: float):
    """kornia's random erasing (Cutout of DeVries & Taylor 2017, part of FixMatch's strong view), or None."""
    if p == 0:
        return None
    import kornia.augmentation as K

    return K.RandomErasing(scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0.0, p=p)


def _weight_average(net: Network, decay: float | None):
    """torch's EMA of the parameters and buffers (batch-norm statistics), or None when off."""
    if decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _alignment(data, task) -> DistributionAlignment:
    """Distribution alignment towards the labeled split's class frequencies."""
    labels = data.labeled.labels[data.labeled_idx]
    counts = np.bincount(labels[labels >= 0], minlength=task.num_classes)[: task.num_classes]
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0).tolist()
        raise ValueError(f"student.consistency_align: classes {missing} have no labeled image, so their prior is 0")
    return DistributionAlignment(torch.as_tensor(counts, dtype=torch.float64))


def student(cfg: Config, run: RunFolder, data, runtime: Runtime, round_: int = 1) -> Path:
    """Trains the student of ``round_`` and returns the path of its weights."""
    folder = run.stage("student", round_)
    weights = folder / "model.safetensors"
    if read_done(folder) and weights.exists():
        log.info("student: round %d already done in %s", round_, folder)
        return weights
    s = cfg.student
    task = build_task(cfg.task, data.labeled)
    pool_index, pseudo_targets = pseudo_records(run.root / "label" / f"round-{round_}", task)
    spec = network_spec(cfg, data)
    if s.backbone and s.backbone != spec.backbone:
        if s.init == "teacher":
            raise ValueError(f"student.init=teacher needs the teacher's backbone ({spec.backbone}), not {s.backbone}")
        spec = dataclasses.replace(spec, backbone=s.backbone)
    seed = cfg.seed * 100 + round_
    torch.manual_seed(seed)  # the initial weights are part of what a seed fixes
    net = Network(spec, drop_rate=s.drop_rate, weights=None if s.init == "random" else resolve_weights(cfg, run))
    _initial_weights(net, s.init, run, round_)
    net.to(runtime.device)
    if runtime.channels_last:
        net.to(memory_format=torch.channels_last)
    aug = BatchAugment(s.augment)
    pool_aug = aug if s.pool_augment in (None, s.augment) else BatchAugment(s.pool_augment)
    erase = _eraser(s.erase)
    ranks = runtime.ranks  # under torchrun each rank takes its share of both batches
    human = BatchIndices(len(data.labeled_idx), s.human_batch_size, seed, ranks, what="student.human_batch_size")
    pseudo = BatchIndices(len(pool_index), s.pseudo_batch_size, seed + 50, ranks, what="student.pseudo_batch_size")
    combine = LossNormalization(alpha=s.alpha, decay=s.average_decay, normalize=s.loss == "normalized")
    nh = human.share
    strong = BatchAugment(s.consistency_augment) if s.consistency_augment else None
    ema = _weight_average(net, s.ema)
    align = _alignment(data, task) if s.consistency_align else None
    balance = ClassBalance(task.num_classes) if s.consistency_balance else None
    adaptive = s.consistency_threshold == "adaptive"
    threshold = AdaptiveThreshold(task.num_classes) if adaptive else s.consistency_threshold
    stateful = {"loss_normalization": combine} | ({"ema": ema} if ema is not None else {})
    stateful |= {"distribution_alignment": align} if align is not None else {}
    stateful |= {"adaptive_threshold": threshold} if adaptive else {}
    stateful |= {"class_balance": balance} if balance is not None else {}

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        if s.alpha_final is not None:  # a function of the step alone, so a resumed run continues the same curve
            combine.alpha = cosine_weight(step, s.steps, s.alpha, s.alpha_final)
        if ema is not None and step > 0:  # the weights after ``step`` updates: a resumed run averages the same ones
            ema.update_parameters(net)
        h = data.labeled_idx[human(step).numpy()]
        p = pseudo(step)
        images = torch.cat([data.labeled.load_batch(h), data.pool.load_batch(pool_index[p.numpy()])])
        target = task.to_device(task.collate([task.load_targets(data.labeled, h), pseudo_targets[p]]), runtime.device)
        clean = runtime.images(images)
        if pool_aug is aug and erase is None:
            x, target = task.augment(aug, clean, target)
        else:  # collate is a concatenation, so the two parts can be augmented apart and joined again
            x_h, t_h = task.augment(aug, clean[:nh], target[:nh])
            x_p, t_p = task.augment(pool_aug, clean[nh:], target[nh:])
            if erase is not None:
                x_p = erase(x_p)
            x, target = torch.cat([x_h, x_p]), task.collate([t_h, t_p])
        with runtime.autocast():
            outputs = net(x)  # one forward pass, so batch norm sees human and pseudo images together
        per_sample = task.loss(outputs, target)
        loss_h, loss_p = per_sample[:nh].mean(), per_sample[nh:].mean()
        out = {"loss": combine(loss_h, loss_p), "loss_human": loss_h.detach(), "loss_pseudo": loss_p.detach()}
        if s.consistency > 0:
            if task.dense:  # segmentation (the config refuses the term for other dense tasks)
                view_aug = strong if strong is not None else pool_aug
                loss_c, used = _mask_consistency(net, task, clean[nh:], view_aug, erase, runtime, threshold)
            else:
                loss_c, used = _consistency(net, clean[nh:], outputs[nh:], strong, erase, runtime, threshold, align, balance)
            out["loss"] = out["loss"] + s.consistency * loss_c
            out["loss_consistency"], out["self_labeled"] = loss_c.detach(), used
        return out

    result = fit(
        net, step_fn, steps=s.steps, optim=s.optim, engine=cfg.engine, out_dir=folder, seed=seed,
        desc=f"student r{round_}", stateful=stateful,
    )  # fmt: skip
    if ema is not None:
        ema.update_parameters(net)  # the last step's weights join the average
        net = ema.module
    meta = {"spec": spec.__dict__, "stage": "student", "round": round_, "seconds": result.seconds, "seed": cfg.seed, "ema": s.ema}
    if ranks.rank == 0:
        export_model(weights, net, meta)
        done = {"seconds": result.seconds, "steps": s.steps, "pseudo_records": int(len(pool_index)), "bad_steps": result.bad_steps}
        atomic_write_text(folder / "done.json", json.dumps(done))
    ranks.barrier()  # the next round's label stage reads this student
    log.info("student: round %d done in %.0f s -> %s", round_, result.seconds, weights)
    return weights
