"""``must-label``: every teacher labels the same pool into one multi-task pseudo-label store.

Ghiasi et al. 2021 (MuST): specialized teachers, each trained on its own labeled dataset and task,
label one shared unlabeled pool, which then holds, per image, a pseudo label of every task.
Partially labeled data: where a pool image has ground truth for a task (``human``), it replaces
the pseudo label. The store (``OUT/must/label/``, :class:`~selftrain.store.PseudoLabelStore`:
atomic shards, manifest last, resumable) has one row per pool image with ``key``, ``index`` and,
for each teacher ``<name>`` (default: its task),

    <name>.*            the task's columns (:mod:`selftrain.tasks.dense`; classification ``probs``,
                        ``label``), null where the task has no label for the image
    <name>.confidence   float32: the teacher's confidence, 1 for ground truth, null when missing
    <name>.source       string: ``pseudo``, ``human`` or ``missing``
    <name>.reason       string: why a ``missing`` record has no label (``no face found``, ``no
                        teacher``...), null otherwise; the manifest counts the reasons

An image can miss a task: a ``callable`` teacher may give no label (no face found), and a task
without a teacher (spec ``none``) has only the images with ground truth. Which images with ground
truth use it (``human_fraction``) is a seeded hash of the image key, so it does not depend on
sharding, and a resumed run ends with exactly the records of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from selftrain.atomic import atomic_write_text
from selftrain.config import Config, MustTeacherConfig
from selftrain.data import Source, build_source
from selftrain.engine import Runtime
from selftrain.label import _load_images
from selftrain.outputs import RunFolder
from selftrain.store import PseudoLabelStore
from selftrain.must.teachers import Teacher, build_teacher, open_pool, teacher_task
from selftrain.tasks.base import Target

log = logging.getLogger("selftrain.must")

PSEUDO, HUMAN, MISSING = "pseudo", "human", "missing"


def store_column(task_column: str, task_name: str, key: str) -> str:
    """A task's column (``segmentation.mask``) under a teacher's name (``seg.mask``)."""
    return key + task_column[len(task_name) :]


def task_table(table: pa.Table, key: str, task) -> pa.Table:
    """Teacher ``key``'s value columns under the task's own names, which ``task.decode_rows`` reads."""
    columns = [c for c in task.pseudo_schema() if not c.endswith(".confidence")]
    return pa.table({c: table.column(store_column(c, task.name, key)) for c in columns})


def same_classes(task, source: Source) -> bool:
    """Whether ``source``'s targets mean what the task's outputs mean (class count; depth always does)."""
    offset = {"classification": 0, "detection": 0, "segmentation": 1}.get(task.name)
    if offset is None:
        return True
    return source.classes is not None and len(source.classes) + offset == task.num_classes


def uses_ground_truth(seed: int, key: str, image_key: str, fraction: float) -> bool:
    """Whether the image ``image_key`` with ground truth for teacher ``key`` uses it (seeded, per image)."""
    if fraction >= 1.0:
        return True
    digest = hashlib.sha256(f"{seed}/{key}/{image_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class HumanLabels:
    """Ground truth of one task for pool images: the pool's own targets, or a source with the pool's keys.

    Args:
        tcfg: The teacher's config (``human``, ``human_fraction``).
        task: The teacher's task object.
        pool: The pool source.
        seed: The run's seed (which images use their ground truth, with ``human_fraction`` < 1).
        where: The config key, for error messages.
    """

    def __init__(self, tcfg: MustTeacherConfig, task, pool: Source, seed: int, where: str) -> None:
        self.key, self.task, self.seed, self.fraction = tcfg.key, task, seed, tcfg.human_fraction
        if tcfg.human == "pool":
            self.source, self.lookup = pool, None
        else:
            self.source = build_source(tcfg.human, image_size=pool.image_size, channels=pool.channels, progress=False)
            self.lookup = {self.source.key(j): j for j in range(len(self.source))}
        task.check_source(self.source, f"{where}.human")
        if not same_classes(task, self.source):
            raise ValueError(f"{where}.human={tcfg.human!r} has {len(self.source.classes or [])} classes; "
                             f"teacher {tcfg.key!r} labels {task.num_classes - (task.name == 'segmentation')}")  # fmt: skip

    def targets(self, pool: Source, indices: np.ndarray) -> list[Target | None]:
        """Ground truth of ``pool[indices]`` where there is some and it is used, else None."""
        out: list[Target | None] = [None] * len(indices)
        where, rows = [], []
        for n, i in enumerate(indices):
            image_key = pool.key(int(i))
            j = int(i) if self.lookup is None else self.lookup.get(image_key)
            if j is not None and uses_ground_truth(self.seed, self.key, image_key, self.fraction):
                where.append(n)
                rows.append(j)
        if rows:
            for n, target in zip(where, self.task.human_targets(self.source, np.asarray(rows, dtype=np.int64))):
                out[n] = target
        return out


class TaskLabels:
    """One teacher's column values over a shard, filled batch by batch."""

    def __init__(self, key: str, task) -> None:
        self.key, self.task = key, task
        schema = task.pseudo_schema()
        self.types = {store_column(c, task.name, key): t for c, t in schema.items()}
        self.values: dict[str, list] = {c: [] for c in self.types}
        self.values[f"{key}.source"] = []
        self.values[f"{key}.reason"] = []

    def add(self, targets: list[Target | None], confidence: list[float | None], sources: list[str], reasons: list[str | None]) -> None:
        """One batch: a target dict (or None: missing), a confidence, a source and a reason (missing ones) per image."""
        present = [n for n, t in enumerate(targets) if t is not None]
        encoded = self.task.record_columns([targets[n] for n in present]) if present else {}
        encoded = {store_column(c, self.task.name, self.key): v for c, v in encoded.items()}
        encoded[f"{self.key}.confidence"] = [confidence[n] for n in present]
        for column in self.types:
            full: list = [None] * len(targets)  # null where the image has no label of this task
            for n, value in zip(present, encoded.get(column, [])):
                full[n] = value
            self.values[column] += full
        self.values[f"{self.key}.source"] += sources
        self.values[f"{self.key}.reason"] += [r if s == MISSING else None for s, r in zip(sources, reasons)]

    def columns(self) -> dict[str, pa.Array]:
        types = {**self.types, f"{self.key}.source": pa.string(), f"{self.key}.reason": pa.string()}
        return {c: pa.array(self.values[c], type=types[c]) for c in types}


def label_batch(teacher: Teacher | None, human: HumanLabels | None, pool: Source, indices: np.ndarray, images: torch.Tensor,
                runtime: Runtime) -> tuple[list[Target | None], list[float | None], list[str], list[str | None]]:  # fmt: skip
    """One teacher's labels for one batch: pseudo labels, replaced by ground truth where it is used;
    and why an image has neither (the teacher's reason, or ``no teacher`` for a ground-truth-only task)."""
    n = len(indices)
    targets: list[Target | None] = [None] * n
    confidence: list[float | None] = [None] * n
    sources = [MISSING] * n
    reasons: list[str | None] = ["no teacher"] * n
    if teacher is not None:
        pseudo, conf, reasons = teacher.label(images, runtime)
        for i, (t, c) in enumerate(zip(pseudo, conf)):
            if t is not None:
                targets[i], confidence[i], sources[i] = t, float(c), PSEUDO
    if human is not None:
        for i, t in enumerate(human.targets(pool, indices)):
            if t is not None:
                targets[i], confidence[i], sources[i] = t, 1.0, HUMAN
    return targets, confidence, sources, reasons


def label_shard(entries, pool: Source, indices: np.ndarray, cfg: Config, runtime: Runtime) -> tuple[pa.Table, list[dict]]:
    """Every teacher's labels for one input shard -> (store table, skipped images)."""
    labels = {key: TaskLabels(key, task) for key, task, _, _ in entries}
    keys, kept, skips = [], [], []
    for start in range(0, len(indices), cfg.label.batch_size):
        images, good, bad = _load_images(pool, indices[start : start + cfg.label.batch_size], cfg.data.strict)
        skips += bad
        if len(good) == 0:
            continue
        for key, _, teacher, human in entries:
            labels[key].add(*label_batch(teacher, human, pool, good, images, runtime))
        keys += [pool.key(int(i)) for i in good]
        kept.append(good)
    columns = {"key": pa.array(keys, pa.string()), "index": pa.array(np.concatenate(kept) if kept else [], pa.int64())}
    for task_labels in labels.values():
        columns.update(task_labels.columns())
    return pa.table(columns), skips


def build_entries(cfg: Config, run: RunFolder, runtime: Runtime, pool: Source) -> list[tuple[str, object, Teacher | None, HumanLabels | None]]:
    """(name, task, teacher or None, ground truth or None) of every configured teacher, in order."""
    entries = []
    for i, tcfg in enumerate(cfg.must.teachers):
        where = f"must.teachers.{i}"
        teacher = build_teacher(cfg, i, run, runtime, pool)
        task = teacher.task if teacher is not None else teacher_task(tcfg, pool, where)
        human = HumanLabels(tcfg, task, pool, cfg.seed, where) if tcfg.human else None
        entries.append((tcfg.key, task, teacher, human))
    return entries


def store_dir(run: RunFolder) -> Path:
    return run.root / "must" / "label"


def must_label(cfg: Config, run: RunFolder, runtime: Runtime) -> Path:
    """Trains the teachers that need it, labels the pool with all of them; returns the store folder."""
    pool, pool_idx = open_pool(cfg)
    if len(pool_idx) == 0:
        raise ValueError(f"data.unlabeled={cfg.data.unlabeled!r}: the pool is empty")
    entries = build_entries(cfg, run, runtime, pool)
    size = cfg.label.shard_size
    fingerprint = {
        "pool": pool.uri, "pool_size": int(len(pool_idx)), "seed": cfg.seed,
        "pool_first_last": [pool.key(int(pool_idx[0])), pool.key(int(pool_idx[-1]))],
        "teachers": {key: {"task": task.name, "spec": tcfg.spec, "model": None if teacher is None else teacher.fingerprint,
                           "encoding": task.pseudo_fingerprint(cfg.label), "human": tcfg.human,
                           "human_fraction": tcfg.human_fraction}
                     for (key, task, teacher, _), tcfg in zip(entries, cfg.must.teachers)},
    }  # fmt: skip
    folder = store_dir(run)
    store = PseudoLabelStore.create(folder, fingerprint=fingerprint, n_shards=(len(pool_idx) + size - 1) // size,
                                    shard_size=size, tasks=[e[0] for e in entries])  # fmt: skip
    if store.complete:
        log.info("must-label: already done in %s", folder)
        return folder
    (folder / "skips").mkdir(exist_ok=True)
    for shard in tqdm(store.pending_shards(), desc="must-label", disable=not cfg.engine.progress, leave=False, unit="shard"):
        table, skips = label_shard(entries, pool, pool_idx[shard * size : (shard + 1) * size], cfg, runtime)
        # The skip list goes first: once the shard exists, its skips must be on disk too.
        atomic_write_text(folder / "skips" / f"shard-{shard:05d}.json", json.dumps(skips))
        store.write_shard(shard, table)
    manifest = _manifest(store, cfg, entries, int(len(pool_idx)), pool)
    store.write_manifest(manifest)
    for key, stats in manifest["stats"].items():
        log.info("must-label: %s: %d pseudo, %d human, %d missing %s, mean pseudo confidence %s",
                 key, stats["pseudo"], stats["human"], stats["missing"], stats["missing_reasons"], stats["mean_confidence"])  # fmt: skip
    return folder


def _has_truth(task, pool: Source) -> bool:
    """Whether the pool hides targets of the task's kind and classes (scenes, or an annotated pool)."""
    try:
        task.check_source(pool, "pool")
    except ValueError:
        return False
    return hasattr(pool, "load_targets") and same_classes(task, pool)


def _pseudo_quality(store: PseudoLabelStore, key: str, task, pool: Source) -> dict[str, float]:
    """The task's pseudo-label quality (``task.quality_meter``) of the pseudo records against the pool's hidden targets."""
    meter = task.quality_meter()
    values = [store_column(c, task.name, key) for c in task.pseudo_schema() if not c.endswith(".confidence")]
    columns = ["index", f"{key}.source", *values]
    for _, shard in store.iter_shards(columns, allow_partial=True):
        rows = [i for i, s in enumerate(shard.column(f"{key}.source").to_pylist()) if s == PSEUDO]
        if rows:
            part = shard.take(rows)
            meter.update(task.decode_rows(task_table(part, key, task)), task.metric_targets(pool, part.column("index").to_numpy()))
    return {k: round(float(v), 4) for k, v in meter.compute().items()}


def _manifest(store: PseudoLabelStore, cfg: Config, entries, total: int, pool: Source) -> dict:
    """Counts per task and source, mean pseudo confidence, how many pass the student's threshold and,
    where the pool hides targets of a dense task, the pseudo labels' quality against them."""
    skips = []
    for f in sorted((store.root / "skips").glob("shard-*.json")):
        skips += json.loads(f.read_text())
    stats = {}
    for (key, task, _, _), tcfg in zip(entries, cfg.must.teachers):
        table = store.read(columns=[f"{key}.source", f"{key}.confidence", f"{key}.reason"], allow_partial=True)
        source = np.asarray(table.column(f"{key}.source").to_pylist(), dtype=object)
        reasons = Counter(r for r in table.column(f"{key}.reason").to_pylist() if r is not None)
        conf = table.column(f"{key}.confidence").to_numpy(zero_copy_only=False)
        pseudo = source == PSEUDO
        stats[key] = {
            "task": task.name, "spec": tcfg.spec, **{s: int((source == s).sum()) for s in (PSEUDO, HUMAN, MISSING)},
            "mean_confidence": round(float(conf[pseudo].mean()), 4) if pseudo.any() else None,
            "pseudo_over_threshold": int((conf[pseudo] >= tcfg.threshold).sum()), "threshold": tcfg.threshold,
            "missing_reasons": dict(sorted(reasons.items())),
        }  # fmt: skip
        if pseudo.any() and task.dense and _has_truth(task, pool):
            stats[key]["quality"] = _pseudo_quality(store, key, task, pool)
    return {"stage": "must-label", "seed": cfg.seed, "pool": cfg.data.unlabeled, "teachers": store.header["fingerprint"]["teachers"],
            "total": total, "processed": total - len(skips), "skipped": len(skips), "skips": skips, "stats": stats}  # fmt: skip
