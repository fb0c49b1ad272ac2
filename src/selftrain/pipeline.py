"""``run CONFIG``: the stages a config lists, in order, in one output folder.

Every stage is resumable: finished stages leave a ``done.json`` and are skipped, an
interrupted training stage continues from its last checkpoint, and an interrupted ``label``
continues with the store shards it had not written.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selftrain.atomic import atomic_write_text
from selftrain.config import Config
from selftrain.data import Source, build_source, labeled_subset, load_split, save_split, scan
from selftrain.engine import Runtime, build_runtime
from selftrain.outputs import RunFolder
from selftrain.tasks import build_task

log = logging.getLogger("selftrain")


@dataclass
class PreparedData:
    """The three sources of a run and the indices of each that the run uses."""

    labeled: Source
    labeled_idx: np.ndarray
    pool: Source | None
    pool_idx: np.ndarray
    test: Source | None
    test_idx: np.ndarray
    classes: list[str]
    channels: int
    image_size: int

    @property
    def pool_truth(self) -> np.ndarray | None:
        """Hidden labels of the pool, when it has any and they share the teacher's classes."""
        if self.pool is None or self.pool.classes != self.classes:
            return None
        return self.pool.labels[self.pool_idx]

    @property
    def pool_targets(self) -> Source | None:
        """The pool, when it has dense targets (``load_targets``) of the teacher's classes."""
        if self.pool is None or self.pool.classes != self.classes or not hasattr(self.pool, "load_targets"):
            return None
        return self.pool


def _open(uri: str, cfg: Config, image_size: int | None, channels: int | None) -> Source:
    return build_source(uri, image_size=image_size, channels=channels, strict=cfg.data.strict)


def _scanned(source: Source, cfg: Config, indices: np.ndarray, name: str, report: dict) -> np.ndarray:
    """Drops the images of ``indices`` that fail to decode; records the skips in ``report``."""
    result = scan(source, strict=cfg.data.strict, progress=cfg.engine.progress, desc=f"scan {name}")
    report[name] = {**source.describe(), **result.to_dict()}
    return indices[np.isin(indices, result.good)]


def prepare_data(cfg: Config, run: RunFolder) -> PreparedData:
    """Opens the sources, draws (or reloads) the labeled split and checks every image once."""
    d = cfg.data
    labeled = _open(d.labeled, cfg, d.image_size, d.channels)
    if labeled.classes is None:
        raise ValueError(f"data.labeled={d.labeled!r} has no labels; give a labeled source (e.g. class sub-folders)")
    image_size = d.image_size
    if image_size is None:
        if not labeled.in_memory:
            image_size = 32
            labeled = _open(d.labeled, cfg, image_size, d.channels)
            log.info("data.image_size not set; using %d px for %s", image_size, d.labeled)
        else:
            image_size = int(labeled.load_batch([0]).shape[-1])
    channels = d.channels or labeled.channels
    task = build_task(cfg.task, labeled.classes)
    task.check_source(labeled, "data.labeled")

    split_path = run.root / "splits" / f"labeled-{d.label_fraction:g}-seed{cfg.seed}.json"
    labeled_idx = labeled_subset(labeled.labels, d.label_fraction, cfg.seed)
    keys = [labeled.key(int(i)) for i in labeled_idx]
    if split_path.exists():
        saved, _ = load_split(split_path)
        if saved != keys:
            raise ValueError(f"{split_path}: the labeled split on disk differs from the one drawn now; the data changed")
    else:
        save_split(split_path, keys, {"uri": d.labeled, "fraction": d.label_fraction, "seed": cfg.seed})

    report: dict = {}
    labeled_idx = _scanned(labeled, cfg, labeled_idx, "labeled", report)
    pool, pool_idx = None, np.empty(0, dtype=np.int64)
    if d.unlabeled:
        if d.unlabeled == d.labeled:
            pool = labeled
            pool_idx = np.setdiff1d(np.arange(len(labeled)), labeled_subset(labeled.labels, d.label_fraction, cfg.seed))
        else:
            pool = _open(d.unlabeled, cfg, image_size, channels)
            pool_idx = np.arange(len(pool))
        if d.pool_limit:
            pool_idx = pool_idx[: d.pool_limit]
        report["pool"] = {**pool.describe(), "used": int(len(pool_idx))}
    test, test_idx = None, np.empty(0, dtype=np.int64)
    if d.test:
        test = _open(d.test, cfg, image_size, channels)
        task.check_source(test, "data.test")
        test_idx = _scanned(test, cfg, np.arange(len(test)), "test", report)
    atomic_write_text(run.root / "data.json", json.dumps(report, indent=2, default=str))
    return PreparedData(labeled, labeled_idx, pool, pool_idx, test, test_idx, list(labeled.classes), channels, image_size)


def run_pipeline(cfg: Config, out: str | Path, *, stages: list[str] | None = None, resume: str = "auto") -> Path:
    """Runs ``stages`` (default: the config's) into ``out`` and returns the folder."""
    from selftrain import label, student, teach, transfer

    run = RunFolder(out)
    if resume == "never" and run.root.exists() and any(run.root.iterdir()):
        raise FileExistsError(f"{run.root} is not empty and --resume never was given")
    run.write_provenance(cfg)
    runtime: Runtime = build_runtime(cfg.engine)
    log.info("run %s: device %s, precision %s", run.root, runtime.device, runtime.precision)
    data = prepare_data(cfg, run)
    todo = stages or cfg.stages
    if "teach" in todo:
        teach.teach(cfg, run, data, runtime)
    for round_ in range(1, cfg.student.rounds + 1):
        if "label" in todo:
            label.label(cfg, run, data, runtime, round_)
        if "student" in todo:
            student.student(cfg, run, data, runtime, round_)
    if "transfer" in todo:
        transfer.transfer(cfg, run, data, runtime)
    return run.root
