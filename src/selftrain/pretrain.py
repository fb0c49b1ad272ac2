"""``pretrain``: supervised or self-supervised pre-training of the backbone, before ``teach``.

Supervised pre-training trains a classifier on every label of ``pretrain.data`` (a source
dataset, as ImageNet is for COCO in Zoph et al. 2020). Self-supervised pre-training (SimCLR,
MoCo v2, BYOL, SwAV with multi-crop; :mod:`selftrain.pretraining`) learns from images alone:
``pretrain.data``, or the run's unlabeled pool. Alongside, an online linear probe learns the
source's classes from *detached* features, so it monitors the representation without shaping
it (its accuracy on the test set, when the classes agree, lands in ``backbone.json``).

The backbone alone is exported, classifier and heads dropped, as ``pretrain/backbone.safetensors``
with timm's parameter names for a timm backbone (``timm.create_model(name, pretrained=True,
pretrained_cfg_overlay={"file": path}, num_classes=0)`` reads it). ``model.weights: pretrain``
makes teach, student (``init: scratch``) and transfer start from it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from selftrain.atomic import atomic_write_text
from selftrain.backbones import BACKBONES, build_backbone
from selftrain.checkpoint import save_weights
from selftrain.config import PRETRAINED_BY_RUN, Config
from selftrain.data import Source, build_source
from selftrain.engine import BatchIndices, Runtime, fit
from selftrain.network import image_statistics
from selftrain.outputs import RunFolder, read_done
from selftrain.pretraining import Method, build_method

log = logging.getLogger("selftrain.pretrain")

BACKBONE_FILE = "backbone.safetensors"


def init_name(cfg: Config) -> str:
    """The ``init`` column of a run's results: random, supervised, ssl:<method> or pretrained (a file)."""
    weights = cfg.model.weights
    if weights is None:
        return "random"
    if weights == PRETRAINED_BY_RUN:
        return pretrain_name(cfg)
    return "pretrained"


def pretrain_name(cfg: Config) -> str:
    """``supervised`` or ``ssl:<method>``: how the run's pretrain stage trains its backbone."""
    method = cfg.pretrain.method
    return "supervised" if method == "supervised" else f"ssl:{method}"


def resolve_weights(cfg: Config, run: RunFolder) -> str | None:
    """``model.weights`` as a file: ``pretrain`` is this run's exported backbone; other values are paths."""
    if cfg.model.weights != PRETRAINED_BY_RUN:
        return cfg.model.weights
    path = run.root / "pretrain" / BACKBONE_FILE
    if not (path.exists() and read_done(path.parent)):
        raise FileNotFoundError(
            f"model.weights={PRETRAINED_BY_RUN!r} but {path} is missing: run the pretrain stage first "
            f"(add pretrain to stages, or `selftrain pretrain CONFIG --out {run.root}`)"
        )
    return str(path)


def pretrain_source(cfg: Config, data) -> tuple[Source, np.ndarray]:
    """The images to pre-train on: ``pretrain.data`` whole, else the run's unlabeled pool."""
    p = cfg.pretrain
    if p.data is not None:
        source = build_source(p.data, image_size=data.image_size, channels=data.channels, strict=cfg.data.strict,
                              progress=cfg.engine.progress)  # fmt: skip
        if not source.in_memory:
            from selftrain.data import scan

            return source, scan(source, strict=cfg.data.strict, progress=cfg.engine.progress, desc="scan pretrain").good
        return source, np.arange(len(source))
    if data.pool is None or len(data.pool_idx) == 0:
        raise ValueError("pretrain: no images to pre-train on; set pretrain.data or data.unlabeled")
    return data.pool, data.pool_idx


def _check_labels(method: Method, source: Source, idx: np.ndarray, uri: str | None) -> None:
    if method.needs_labels and (source.classes is None or (source.labels[idx] < 0).any()):
        raise ValueError(f"pretrain.data={uri!r}: supervised pre-training needs a class for every image")
    if source.labels[idx].max(initial=-1) >= len(source.classes or []):
        raise ValueError(f"pretrain.data={uri!r}: a label is out of range of its {len(source.classes or [])} classes")


def build_pretrain_model(cfg: Config, source: Source, idx: np.ndarray, image_size: int, channels: int) -> Method:
    """The method around a freshly initialized backbone, plus an online probe where the source has labels."""
    p = cfg.pretrain
    mean, std = image_statistics(source.load_batch(idx[: min(len(idx), 2000)]))
    torch.manual_seed(cfg.seed)  # the initial weights are part of what a seed fixes
    backbone = build_backbone(cfg.model.backbone, num_classes=0, in_chans=channels)
    classes = len(source.classes or [])
    method = build_method(p.method, backbone, p, steps=p.steps, image_size=image_size, channels=channels,
                          num_classes=classes, mean=mean, std=std)  # fmt: skip
    _check_labels(method, source, idx, p.data)
    has_labels = classes > 1 and bool((source.labels[idx] >= 0).any())
    # A submodule of the method, so checkpoints hold it; it only ever sees detached features.
    method.probe = nn.Linear(method.dim, classes) if p.probe and has_labels else None
    if p.probe and not has_labels:
        log.info("pretrain: %s has no labels; the online probe is off", source.uri)
    return method


def pretrain(cfg: Config, run: RunFolder, data, runtime: Runtime) -> Path:
    """Pre-trains (or reuses a finished) backbone and returns the path of its weights."""
    folder = run.stage("pretrain")
    weights = folder / BACKBONE_FILE
    if read_done(folder) and weights.exists():
        log.info("pretrain: already done in %s", folder)
        return weights
    p = cfg.pretrain
    source, idx = pretrain_source(cfg, data)
    if p.method == "supervised" and p.data == cfg.data.labeled:
        log.warning("pretrain: supervised pre-training on data.labeled uses all %d of its labels, not the labeled split", len(idx))
    model = build_pretrain_model(cfg, source, idx, data.image_size, data.channels).to(runtime.device)
    ranks = runtime.ranks  # under torchrun each rank takes its share of every batch
    batches = BatchIndices(len(idx), p.batch_size, cfg.seed * 1000 + 17, ranks, what="pretrain.batch_size")
    labels_all = torch.from_numpy(np.array(source.labels))  # a writable copy

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        b = idx[batches(step).numpy()]
        return pretrain_step(model, runtime.images(source.load_batch(b)), labels_all[b].to(runtime.device), step, runtime)

    log.info("pretrain: %s on %d images of %s, %d steps of %d", p.method, len(idx), source.uri, p.steps, p.batch_size)
    # An online probe gets no gradient from a batch without labels: then DDP must look for unused parameters.
    unused = model.probe is not None and bool((labels_all[idx] < 0).any())
    result = fit(model, step_fn, steps=p.steps, optim=p.optim, engine=cfg.engine, out_dir=folder, seed=cfg.seed,
                 desc=f"pretrain {p.method}", find_unused_parameters=unused)  # fmt: skip
    probe = probe_accuracy(model, source, data, runtime, cfg.engine.eval_batch_size)
    meta = {
        "method": p.method, "init": pretrain_name(cfg), "steps": p.steps, "batch_size": p.batch_size,
        "data": source.uri, "images": int(len(idx)), "source_images": len(source), "backbone": cfg.model.backbone,
        "timm": cfg.model.backbone not in BACKBONES, "channels": data.channels, "image_size": data.image_size,
        "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(), "probe_top1": probe,
        "seconds": round(result.seconds, 2), "bad_steps": result.bad_steps, "seed": cfg.seed,
    }  # fmt: skip
    if ranks.rank == 0:
        save_weights(weights, model.backbone.state_dict(), metadata={"selftrain": json.dumps(meta)})
        atomic_write_text(weights.with_suffix(".json"), json.dumps(meta, indent=2))
        atomic_write_text(folder / "done.json", json.dumps({"seconds": result.seconds, "steps": p.steps, "probe_top1": probe}))
    ranks.barrier()  # teach and student start from this backbone
    log.info("pretrain: done in %.0f s -> %s (online probe top-1 %s)", result.seconds, weights, probe)
    return weights


def pretrain_step(model: Method, images: torch.Tensor, labels: torch.Tensor, step: int, runtime: Runtime) -> dict[str, torch.Tensor]:
    """One step's losses: the method's objective plus the online probe's, whose input is detached.

    Args:
        images: Float batch (B, C, H, W) in [0, 1] on the device.
        labels: (B,) classes, -1 where unknown (the probe skips those images).
    """
    views = model.views(images)
    with runtime.autocast():
        loss, feats = model.loss(views, labels, step)
    out = {"loss": loss, model.cfg.method: loss.detach()}
    if model.probe is not None:
        probe = _probe_step(model.probe, feats.detach().float(), labels)
        out["loss"] = loss + probe["probe_loss"]  # no gradient reaches the backbone: the probe's input is detached
        out.update(probe_loss=probe["probe_loss"].detach(), probe_top1=probe["probe_top1"])
    return out


def _probe_step(probe: nn.Linear, feats: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cross-entropy and batch accuracy of the online probe on the images whose label is known."""
    known = labels >= 0
    if not known.any():
        zero = feats.sum() * 0
        return {"probe_loss": zero, "probe_top1": zero.detach()}
    logits = probe(feats[known])
    top1 = (logits.argmax(1) == labels[known]).float().mean() * 100
    return {"probe_loss": nn.functional.cross_entropy(logits, labels[known]), "probe_top1": top1.detach()}


@torch.no_grad()
def probe_accuracy(model: Method, source: Source, data, runtime: Runtime, batch_size: int) -> float | None:
    """Top-1 (%) of the online probe on the run's test set, when it has the pre-training source's classes."""
    test = data.test
    if model.probe is None or test is None or list(test.classes or []) != list(source.classes or []):
        return None
    model.eval()
    correct = 0
    for start in range(0, len(data.test_idx), batch_size):
        idx = data.test_idx[start : start + batch_size]
        with runtime.autocast():
            logits = model.probe(model.features(runtime.images(test.load_batch(idx))).float())
        correct += int((logits.argmax(1).cpu() == torch.as_tensor(test.labels[idx])).sum())
    return round(100 * correct / max(1, len(data.test_idx)), 2)
