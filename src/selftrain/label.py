"""``label``: the teacher pseudo-labels the unlabeled pool into the pseudo-label store.

The pool is cut into input shards of ``label.shard_size`` images; each becomes one store
shard, written atomically, so a killed run resumes with the shards it had not written and
ends with exactly the records of an uninterrupted run. Memory holds one shard at a time.
After the last shard, filtering (confidence threshold) and Noisy Student class balancing
pick the records the student learns from (``selection.parquet``), and the manifest, with
the statistics, is written last.

Several processes label one pool together (``torchrun``, or explicit :class:`Ranks`): rank
``r`` of ``W`` labels the input shards ``i % W == r`` (:func:`~selftrain.store.shards_of_rank`:
static, nothing padded or duplicated) and writes only those store shards; rank 0 starts the
store, waits for every shard (a process-group barrier, or polling the store folder when the
ranks are independent processes), then writes the selection and the manifest. A killed
rank's job, rerun, labels only the shards missing on disk.

The teacher of round 1 is the teach stage's model, or, with ``label.teacher`` set, a face model
shipped inside a package (:mod:`selftrain.face_teachers`: ``dlib:landmarks68``, ``fer:emotion``...).
An image where such a teacher finds no face has no record; it is listed with its reason under
``missing`` in the manifest (``labelled`` + ``missing`` = ``processed``).

What a record holds is the task's business (``task.encode_records``; dense columns are listed
in :mod:`selftrain.tasks.dense`). Dense tasks are filtered by ``label.threshold`` on their
per-record confidence and never class-balanced; their statistics measure the pseudo labels
against the pool's hidden targets where it has them (scenes, or a coco:/voc:/depth: pool that is
the labeled source outside its split).
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
from selftrain.config import Config
from selftrain.data import BadImageError
from selftrain.distributed import Ranks, current_ranks, wait_for
from selftrain.engine import Runtime
from selftrain.network import Network, load_network
from selftrain.outputs import RunFolder
from selftrain.selection import select_records, selection_stats
from selftrain.store import HEADER, PseudoLabelStore, remove_temporaries, shards_of_rank
from selftrain.tasks import build_task
from selftrain.teach import teacher_for_round

log = logging.getLogger("selftrain.label")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_images(source, indices: np.ndarray, strict: bool) -> tuple[torch.Tensor, np.ndarray, list[dict]]:
    """Loads a batch; in-memory sources in one go, files one by one so a bad file is skipped."""
    if source.in_memory:
        return source.load_batch(indices), indices, []
    images, good, skips = [], [], []
    for i in indices:
        try:
            images.append(source.load(int(i)))
            good.append(i)
        except BadImageError as err:
            if strict:
                raise
            log.warning("label: skipped %s", err)
            skips.append({"key": source.key(int(i)), "reason": err.reason})
    batch = torch.stack(images) if images else torch.empty(0)
    return batch, np.asarray(good, dtype=np.int64), skips


def _external_records(teacher, task, cfg: Config, batch: torch.Tensor, runtime: Runtime) -> tuple[dict | None, np.ndarray, list[str | None]]:
    """A face teacher's labels of one batch -> (store columns of the labelled images, which they are, reasons).

    Classification records are encoded from the teacher's probabilities as from logits (their
    log), so ``label.temperature``/``hard`` and the confidence (top probability) mean what they
    mean for a trained teacher; a dense record's confidence is the teacher's.
    """
    targets, confidence, reasons = teacher.label(batch, runtime)
    present = np.asarray([n for n, t in enumerate(targets) if t is not None], dtype=np.int64)
    if len(present) == 0:
        return None, present, reasons
    if not task.dense:
        probs = torch.stack([targets[n]["probs"].float() for n in present])
        return task.encode_records(probs.clamp_min(1e-12).log(), cfg.label), present, reasons
    columns = task.record_columns([targets[n] for n in present])
    columns[f"{task.name}.confidence"] = [float(confidence[n]) for n in present]
    return columns, present, reasons


@torch.no_grad()
def label_shard(teacher, task, cfg: Config, data, runtime: Runtime, indices: np.ndarray) -> tuple[pa.Table, list[dict], list[dict]]:
    """Teacher predictions for one input shard -> (store table, skipped images, images without a label).

    ``teacher`` is a selftrain :class:`Network`, or a face teacher (:class:`~selftrain.must.teachers.Teacher`).
    """
    parts: list[dict] = []
    keys, kept, skips, missing = [], [], [], []
    for start in range(0, len(indices), cfg.label.batch_size):
        batch, good, bad = _load_images(data.pool, indices[start : start + cfg.label.batch_size], cfg.data.strict)
        skips += bad
        if len(good) == 0:
            continue
        if isinstance(teacher, Network):
            with runtime.autocast():
                outputs = teacher(runtime.images(batch))
            parts.append(task.encode_records(outputs, cfg.label))
        else:
            columns, present, reasons = _external_records(teacher, task, cfg, batch, runtime)
            missing += [{"key": data.pool.key(int(i)), "reason": r} for i, r in zip(good, reasons) if r is not None]
            if columns is None:
                continue
            parts.append(columns)
            good = good[present]
        keys += [data.pool.key(int(i)) for i in good]
        kept.append(good)
    # No part (every image of the shard was bad): an empty shard that keeps the schema.
    table = pa.table(
        {"key": pa.array(keys, pa.string()), "index": pa.array(np.concatenate(kept) if kept else [], pa.int64()),
         **task.pseudo_table_columns(parts)}
    )  # fmt: skip
    return table, skips, missing


def _filter_config(cfg: Config) -> dict:
    lc = cfg.label
    return {"temperature": lc.temperature, "hard": lc.hard, "threshold": lc.threshold, "balance": lc.balance, "per_class": lc.per_class}


def _classification_selection(store: PseudoLabelStore, cfg: Config, data) -> dict:
    """Threshold + class balancing over the whole pool; statistics with per-class counts and accuracy."""
    table = store.read(columns=["index", "classification.label", "classification.confidence"], allow_partial=True)
    label = table.column("classification.label").to_numpy()
    conf = table.column("classification.confidence").to_numpy()
    k = len(data.classes)
    rows, repeat = select_records(label, conf, threshold=cfg.label.threshold, balance=cfg.label.balance, per_class=cfg.label.per_class, num_classes=k)
    store.write_selection(store.make_selection(rows, repeat))
    truth = None
    if data.pool_truth is not None:
        position = {int(i): n for n, i in enumerate(data.pool_idx)}
        truth = data.pool_truth[[position[int(i)] for i in table.column("index").to_numpy()]]
    return selection_stats(label, conf, rows, repeat, k, truth=truth)


def _dense_selection(store: PseudoLabelStore, cfg: Config, data, task) -> dict:
    """Threshold on the per-record confidence; statistics with the pseudo labels' own quality.

    ``quality`` is the task's metric of every record's pseudo label against the pool's hidden
    targets (segmentation: mIoU over the pixels labelled, and their coverage), when the pool
    has targets of the labeled source's classes.
    """
    table = store.read(columns=["index", f"{task.name}.confidence"], allow_partial=True)
    conf = table.column(f"{task.name}.confidence").to_numpy()
    rows, repeat = select_records(np.zeros(len(conf), np.int64), conf, threshold=cfg.label.threshold)
    store.write_selection(store.make_selection(rows, repeat))
    stats = selection_stats(np.zeros(len(conf), np.int64), conf, rows, repeat, 1)
    stats.pop("per_class")  # one pseudo "class": meaningless here
    stats["records"] = int(len(conf))
    if data.pool_targets is not None:
        meter = task.quality_meter()
        for _, shard in store.iter_shards(["index", *task.pseudo_column_names()], allow_partial=True):
            meter.update(task.decode_rows(shard), task.metric_targets(data.pool, shard.column("index").to_numpy()))
        stats["quality"] = {k: float(v) for k, v in meter.compute().items()}
    return stats


def _finish(store: PseudoLabelStore, cfg: Config, data, round_: int, total: int, task) -> dict:
    """Selection + statistics + manifest (written last)."""
    stats = _dense_selection(store, cfg, data, task) if task.dense else _classification_selection(store, cfg, data)
    skips, missing = [], []
    for f in sorted((store.root / "skips").glob("shard-*.json")):
        skips += json.loads(f.read_text())
    for f in sorted((store.root / "missing").glob("shard-*.json")):
        missing += json.loads(f.read_text())
    manifest = {
        "stage": "label", "round": round_, "seed": cfg.seed, "task": cfg.task, "classes": data.classes,
        "teacher": store.header["fingerprint"]["teacher"], "filter": _filter_config(cfg),
        "total": total, "processed": total - len(skips), "skipped": len(skips), "skips": skips,
        "labelled": total - len(skips) - len(missing), "missing": len(missing),
        "missing_reasons": dict(sorted(Counter(m["reason"] for m in missing).items())), "missing_records": missing,
        "stats": {cfg.task: stats},
    }  # fmt: skip
    store.write_manifest(manifest)
    return store.manifest


def _open_store(folder: Path, ranks: Ranks, **header) -> PseudoLabelStore:
    """Rank 0 starts (or resumes) the store; the others open it once its header exists."""
    if ranks.rank == 0:
        store = PseudoLabelStore.create(folder, rank=0, world_size=ranks.world_size, **header)
    elif not ranks.grouped:
        wait_for(lambda: (folder / HEADER).exists(), f"rank 0 to start the store {folder}", ranks.timeout_s)
    ranks.barrier()
    if ranks.rank != 0:
        store = PseudoLabelStore.create(folder, rank=ranks.rank, world_size=ranks.world_size, **header)
    return store


def _wait_for_shards(store: PseudoLabelStore, ranks: Ranks) -> None:
    """Rank 0 returns once every rank's shards are on disk."""
    if ranks.grouped:
        ranks.barrier()
    elif ranks.rank == 0 and ranks.world_size > 1:
        what = f"the other ranks' shards of {store.root} (rerun the job to label the missing ones)"
        wait_for(lambda: not store.pending_shards(), what, ranks.timeout_s)


def label(cfg: Config, run: RunFolder, data, runtime: Runtime, round_: int = 1, ranks: Ranks | None = None) -> Path:
    """Labels the pool for ``round_`` and returns the store folder.

    ``ranks`` (default: :func:`~selftrain.distributed.current_ranks`) says which shards this
    process labels; only rank 0 writes the selection and manifest and logs the statistics.
    Without a process group, ranks other than 0 return once their own shards are written.
    """
    if data.pool is None or len(data.pool_idx) == 0:
        raise ValueError("label: the config has no unlabeled pool (data.unlabeled)")
    ranks = ranks or current_ranks()
    folder = run.stage("label", round_)
    task = build_task(cfg.task, data.labeled)
    external = cfg.label.teacher != "teach" and round_ == 1
    if external:
        from selftrain.must.teachers import build_face_teacher

        teacher = build_face_teacher(cfg.task, cfg.label.teacher, cfg.label.face_box, cfg.label.teacher_input_size, task=task,
                                     classes=data.classes if not task.dense else None)  # fmt: skip
        teacher_id = teacher.fingerprint
    else:
        teacher_path = teacher_for_round(run, round_)
        teacher_id = file_sha256(teacher_path)
    size = cfg.label.shard_size
    n_shards = (len(data.pool_idx) + size - 1) // size
    fingerprint = {
        "teacher": teacher_id, "pool": data.pool.uri, "pool_size": int(len(data.pool_idx)),
        "pool_first_last": [data.pool.key(int(data.pool_idx[0])), data.pool.key(int(data.pool_idx[-1]))],
        **task.pseudo_fingerprint(cfg.label),
    }  # fmt: skip
    store = _open_store(folder, ranks, fingerprint=fingerprint, n_shards=n_shards, shard_size=size, tasks=[cfg.task])
    for side in ("skips", "missing"):  # per-shard skip and no-label lists a killed run left half-renamed
        remove_temporaries(folder / side, ranks.rank, ranks.world_size)
    if store.complete and store.manifest.get("filter") == _filter_config(cfg):
        log.info("label: round %d already done in %s", round_, folder)
        return folder
    if not external:
        teacher = load_network(teacher_path).to(runtime.device).eval()
        if runtime.channels_last:
            teacher.to(memory_format=torch.channels_last)
    mine = set(shards_of_rank(n_shards, ranks.rank, ranks.world_size))
    pending = [i for i in store.pending_shards() if i in mine]
    (folder / "skips").mkdir(exist_ok=True)
    (folder / "missing").mkdir(exist_ok=True)
    for shard in tqdm(pending, desc=f"label r{round_}", disable=not cfg.engine.progress, leave=False, unit="shard"):
        indices = data.pool_idx[shard * size : (shard + 1) * size]
        table, skips, missing = label_shard(teacher, task, cfg, data, runtime, indices)
        # The skip and missing lists go first: once the shard exists, they must be on disk too.
        atomic_write_text(folder / "skips" / f"shard-{shard:05d}.json", json.dumps(skips))
        atomic_write_text(folder / "missing" / f"shard-{shard:05d}.json", json.dumps(missing))
        store.write_shard(shard, table)
    _wait_for_shards(store, ranks)
    if ranks.rank != 0:
        ranks.barrier()  # returns with rank 0, once the store is complete
        return folder
    try:
        manifest = _finish(store, cfg, data, round_, int(len(data.pool_idx)), task)
    finally:
        ranks.barrier()
    s = manifest["stats"][cfg.task]
    acc = f", pseudo-label accuracy {100 * s['accuracy_all']:.1f}%" if s.get("accuracy_all") is not None else ""
    acc += "".join(f", pseudo-label {k} {v:.3g}" for k, v in s.get("quality", {}).items())
    log.info("label: round %d: %d records, %d kept, mean confidence %s%s", round_, manifest["n_records"], s["kept"], s["mean_confidence"], acc)
    return folder
