"""``run CONFIG``: the stages a config lists (pretrain, teach, label, student, transfer), in order, in one output folder.

Every stage is resumable: finished stages leave a ``done.json`` and are skipped, an
interrupted training stage continues from its last checkpoint, and an interrupted ``label``
continues with the store shards it had not written.

Under ``torchrun`` (``WORLD_SIZE`` above 1) every stage runs on every rank: the training
stages (pretrain, teach, student, transfer's fine-tuning) through DistributedDataParallel, each
rank on its share of every batch (:func:`selftrain.engine.fit`); ``label`` with each rank on
its own input shards (:mod:`selftrain.label`). Every rank draws the same split; only rank 0
writes the provenance, checkpoints, models and results.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selftrain.atomic import atomic_write_text
from selftrain.config import FILE_IMAGE_SIZE, Config
from selftrain.data import Source, build_source, kshot_subset, labeled_subset, load_split, save_split, scan
from selftrain.distributed import current_ranks, init_from_env
from selftrain.engine import Runtime, build_runtime
from selftrain.outputs import RunFolder
from selftrain.tasks import TASKS, build_task

log = logging.getLogger("selftrain")


@dataclass
class PreparedData:
    """The three sources of a run and the indices of each that the run uses.

    ``classes`` are the labeled source's classes (for a segmentation run the object classes,
    mask value ``c + 1``), ``[]`` for a source without classes (depth maps).
    """

    labeled: Source
    labeled_idx: np.ndarray
    pool: Source | None
    pool_idx: np.ndarray
    test: Source | None
    test_idx: np.ndarray
    classes: list[str]
    channels: int
    image_size: int

    def _pool_shares_classes(self) -> bool:
        return self.pool is not None and list(self.pool.classes or []) == self.classes

    @property
    def pool_truth(self) -> np.ndarray | None:
        """Hidden labels of the pool, when it has any and they share the teacher's classes."""
        if not self._pool_shares_classes():
            return None
        return self.pool.labels[self.pool_idx]

    @property
    def pool_targets(self) -> Source | None:
        """The pool, when it has dense targets (``load_targets``) of the teacher's classes."""
        if not self._pool_shares_classes() or not hasattr(self.pool, "load_targets"):
            return None
        return self.pool


def _open(uri: str, cfg: Config, image_size: int | None, channels: int | None) -> Source:
    return build_source(uri, image_size=image_size, channels=channels, strict=cfg.data.strict, progress=cfg.engine.progress)


def _summary(source: Source) -> dict:
    """``describe()`` plus, for annotated sources, every annotation dropped while reading it."""
    skips = getattr(source, "annotation_skips", None)
    return source.describe() if skips is None else {**source.describe(), "annotation_skip_records": list(skips)}


def _scanned(source: Source, cfg: Config, indices: np.ndarray, name: str, report: dict) -> np.ndarray:
    """Drops the images of ``indices`` that fail to decode; records the skips in ``report``."""
    result = scan(source, strict=cfg.data.strict, progress=cfg.engine.progress, desc=f"scan {name}")
    report[name] = {**_summary(source), **result.to_dict()}
    return indices[np.isin(indices, result.good)]


def _labeled_split(cfg: Config, run: RunFolder, labeled: Source, dense: bool) -> np.ndarray:
    """Draws the labeled split and saves its keys, or checks them against the saved ones.

    Seeded and nested (:func:`~selftrain.data.labeled_subset`, or :func:`~selftrain.data.kshot_subset`
    with ``data.shots``), stratified on the source's
    image-level labels where it has any; dense sources keep their images without one.
    """
    d = cfg.data
    size = f"{d.shots}shot" if d.shots else f"{d.label_fraction:g}"
    split_path = run.root / "splits" / f"labeled-{size}-seed{cfg.seed}.json"
    if d.shots:
        labeled_idx = kshot_subset(labeled.labels, d.shots, cfg.seed)
    else:
        labeled_idx = labeled_subset(labeled.labels, d.label_fraction, cfg.seed, keep_unknown=dense)
    keys = [labeled.key(int(i)) for i in labeled_idx]
    if split_path.exists():
        saved, _ = load_split(split_path)
        if saved != keys:
            raise ValueError(f"{split_path}: the labeled split on disk differs from the one drawn now; the data changed")
    else:
        stratified = bool((labeled.labels >= 0).any())
        save_split(split_path, keys, {"uri": d.labeled, "fraction": d.label_fraction, "shots": d.shots, "seed": cfg.seed,
                                      "stratified": stratified})  # fmt: skip
    return labeled_idx


def prepare_data(cfg: Config, run: RunFolder) -> PreparedData:
    """Opens the sources, draws (or reloads) the labeled split and checks every image once."""
    d = cfg.data
    labeled = _open(d.labeled, cfg, d.image_size, d.channels)
    if labeled.classes is None and TASKS.get(cfg.task).needs_classes:
        raise ValueError(
            f"data.labeled={d.labeled!r} has no labels, which task {cfg.task!r} needs; give a labeled source "
            "(e.g. class sub-folders, or coco:/voc: annotations for detection and segmentation)"
        )
    image_size = d.image_size
    if image_size is None:
        if not labeled.in_memory:
            image_size = FILE_IMAGE_SIZE
            labeled = _open(d.labeled, cfg, image_size, d.channels)
            log.info("data.image_size not set; resizing the images of %s (and of the pool and test set) to %d px",
                     d.labeled, image_size)  # fmt: skip
        else:
            image_size = int(labeled.load_batch([0]).shape[-1])
    channels = d.channels or labeled.channels
    classes = list(labeled.classes or [])
    task = build_task(cfg.task, labeled)
    task.check_source(labeled, "data.labeled")
    split_idx = _labeled_split(cfg, run, labeled, task.dense)

    report: dict = {}
    labeled_idx = _scanned(labeled, cfg, split_idx, "labeled", report)
    pool, pool_idx = None, np.empty(0, dtype=np.int64)
    if d.unlabeled:
        if d.unlabeled == d.labeled:
            pool = labeled
            pool_idx = np.setdiff1d(np.arange(len(labeled)), split_idx)
        else:
            pool = _open(d.unlabeled, cfg, image_size, channels)
            pool_idx = np.arange(len(pool))
        if d.pool_limit:
            pool_idx = pool_idx[: d.pool_limit]
        report["pool"] = {**_summary(pool), "used": int(len(pool_idx))}
    test, test_idx = None, np.empty(0, dtype=np.int64)
    if d.test:
        test = _open(d.test, cfg, image_size, channels)
        task.check_source(test, "data.test")
        if task.needs_classes and test.classes is not None and list(test.classes) != classes:
            raise ValueError(
                f"data.test={d.test!r} has the classes {list(test.classes)}, data.labeled={d.labeled!r} "
                f"{classes}; a model can only be measured on the classes it learns"
            )
        test_idx = _scanned(test, cfg, np.arange(len(test)), "test", report)
    atomic_write_text(run.root / "data.json", json.dumps(report, indent=2, default=str))
    return PreparedData(labeled, labeled_idx, pool, pool_idx, test, test_idx, classes, channels, image_size)


def run_pipeline(cfg: Config, out: str | Path, *, stages: list[str] | None = None, resume: str = "auto") -> Path:
    """Runs ``stages`` (default: the config's) into ``out`` and returns the folder."""
    todo = stages or cfg.stages
    ranks = current_ranks()
    run = RunFolder(out)
    if resume == "never" and ranks.rank == 0 and run.root.exists() and any(run.root.iterdir()):
        raise FileExistsError(f"{run.root} is not empty and --resume never was given")
    runtime: Runtime = build_runtime(cfg.engine)
    started = init_from_env(runtime.device)
    try:
        if ranks.rank == 0:
            run.write_provenance(cfg)
        current_ranks().barrier()  # the others start once rank 0 accepted the folder
        log.info("run %s: device %s, precision %s", run.root, runtime.device, runtime.precision)
        data = prepare_data(cfg, run)
        _run_stages(cfg, run, data, runtime, todo)
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    return run.root


def _run_stages(cfg: Config, run: RunFolder, data: PreparedData, runtime: Runtime, todo: list[str]) -> None:
    from selftrain import label, pretrain, student, teach, transfer

    if "pretrain" in todo:
        pretrain.pretrain(cfg, run, data, runtime)
    if "teach" in todo:
        teach.teach(cfg, run, data, runtime)
    for round_ in range(1, cfg.student.rounds + 1):
        if "label" in todo:
            label.label(cfg, run, data, runtime, round_)
        if "student" in todo:
            student.student(cfg, run, data, runtime, round_)
    if "transfer" in todo:
        transfer.transfer(cfg, run, data, runtime)
