"""Which pseudo-labeled records the student learns from: confidence filtering and class balancing.

Filtering keeps records whose confidence reaches a threshold (Zoph et al. 2020); balancing is
Noisy Student's (Xie et al. 2020): every class is brought to the same count K by keeping its
K most confident records or by duplicating the ones it has. Rows index the store's records
in shard order; :meth:`selftrain.store.PseudoLabelStore.make_selection` turns them into the
store's ``selection.parquet``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_HIST_EDGES = [round(i / 20, 2) for i in range(21)]


def _class_repeats(order: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows (most confident first) and repeats that give one class exactly ``target``."""
    if len(order) >= target:
        return order[:target], np.ones(target, np.int32)
    base, extra = divmod(target, len(order))
    repeat = np.full(len(order), base, np.int32)
    repeat[:extra] += 1
    return order, repeat


def select_records(
    label: np.ndarray,
    confidence: np.ndarray,
    *,
    threshold: float = 0.0,
    balance: bool = False,
    per_class: int | None = None,
    num_classes: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Choose the pseudo-labeled records a student trains on (deterministic).

    Filtering keeps ``confidence >= threshold`` (NaN never passes). Balancing follows
    Noisy Student (Xie et al. 2020): every class with kept records ends with exactly K
    records, K being ``per_class`` or the median kept count over the classes that kept
    any (rounded down). Larger classes keep their K most confident records (ties: lower
    row first); smaller ones repeat theirs, the most confident getting the extra copies
    (3 records, K=7 -> repeats 3, 2, 2). Classes that kept nothing stay empty.

    Args:
        label: Predicted class per record (int), in store order.
        confidence: Confidence per record, same length.
        threshold: Minimum confidence to keep a record.
        balance: Balance classes as described above.
        per_class: Target K for balancing (needs ``balance``).
        num_classes: Number of classes; default ``label.max() + 1``.

    Returns:
        ``(rows, repeat)``: sorted int64 rows into the store and int32 repeats (>= 1).

    Raises:
        ValueError: On mismatched lengths, labels out of range or a bad ``per_class``.
    """
    label, confidence = np.asarray(label), np.asarray(confidence)
    if label.shape != confidence.shape or label.ndim != 1:
        raise ValueError(f"select_records: label {label.shape} and confidence "
                         f"{confidence.shape} must be 1-d arrays of the same length")
    if per_class is not None and (not balance or per_class < 1):
        raise ValueError(f"select_records: per_class={per_class} needs balance=True and >= 1")
    kept = np.flatnonzero(confidence >= threshold).astype(np.int64)
    if not balance:
        return kept, np.ones(len(kept), np.int32)
    n_cls = num_classes if num_classes is not None else int(label.max(initial=-1)) + 1
    if label.size and (label.min() < 0 or label.max() >= n_cls):
        raise ValueError(f"select_records: labels must lie in 0..{n_cls - 1}")
    counts = np.bincount(label[kept], minlength=n_cls)
    if not counts.any():
        return kept, np.ones(0, np.int32)
    target = per_class if per_class is not None else int(np.median(counts[counts > 0]))
    target = max(target, 1)
    # Stable order within a class: confidence descending, then row ascending.
    ordered = kept[np.lexsort((kept, -confidence[kept].astype(np.float64)))]
    parts = [_class_repeats(ordered[label[ordered] == c], target)
             for c in range(n_cls) if counts[c]]
    rows = np.concatenate([p[0] for p in parts])
    repeat = np.concatenate([p[1] for p in parts])
    by_row = np.argsort(rows, kind="stable")
    return rows[by_row], repeat[by_row]


def _histogram(values: np.ndarray) -> list[int]:
    values = np.clip(values[np.isfinite(values)], 0.0, 1.0)
    return np.histogram(values, bins=np.asarray(_HIST_EDGES))[0].astype(int).tolist()


def selection_stats(
    label: np.ndarray,
    confidence: np.ndarray,
    rows: np.ndarray,
    repeat: np.ndarray,
    num_classes: int,
    truth: np.ndarray | None = None,
) -> dict[str, Any]:
    """Summarise a selection for the manifest and the report.

    Args:
        label: Predicted class per record.
        confidence: Confidence per record.
        rows: Selected rows, as from :func:`select_records`.
        repeat: Repeat count per selected row.
        num_classes: Length of ``per_class``.
        truth: Optional true class per record; negative means unknown.

    Returns:
        ``kept`` (sum of repeats), ``unique``, ``per_class`` (with repeats),
        ``mean_confidence`` over unique kept rows, ``confidence_histogram`` (20 bins on
        [0, 1] over all records) and, with ``truth``, ``accuracy_all``, ``accuracy_kept``,
        ``confidence_histogram_correct`` and ``confidence_histogram_wrong`` (counts over
        all records with truth). Means over no records are None.
    """
    label, confidence = np.asarray(label), np.asarray(confidence, dtype=np.float64)
    rows, repeat = np.asarray(rows, dtype=np.int64), np.asarray(repeat, dtype=np.int64)
    if rows.shape != repeat.shape:
        raise ValueError(f"selection_stats: rows {rows.shape} and repeat {repeat.shape} differ")
    per_class = np.bincount(label[rows], weights=repeat, minlength=num_classes)
    stats: dict[str, Any] = {
        "kept": int(repeat.sum()),
        "unique": int(len(rows)),
        "per_class": per_class.astype(int).tolist(),
        "mean_confidence": float(confidence[rows].mean()) if len(rows) else None,
        "confidence_histogram": {"edges": list(_HIST_EDGES), "counts": _histogram(confidence)},
    }
    if truth is not None:
        truth = np.asarray(truth)
        known = truth >= 0
        correct = label == truth
        known_kept = known[rows]
        stats["accuracy_all"] = float(correct[known].mean()) if known.any() else None
        stats["accuracy_kept"] = (
            float(correct[rows][known_kept].mean()) if known_kept.any() else None
        )
        stats["confidence_histogram_correct"] = _histogram(confidence[known & correct])
        stats["confidence_histogram_wrong"] = _histogram(confidence[known & ~correct])
    return stats
