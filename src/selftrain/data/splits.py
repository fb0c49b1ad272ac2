"""Label-fraction splits: which samples keep their labels in a semi-supervised run.

Subsets are nested by construction: for a given seed every class is shuffled
once with an RNG seeded by ``(seed, class)`` and a fraction takes a prefix of
that order, so the 1% subset is always inside the 10% subset. Comparisons
across label fractions then differ only in how many labels were added.

Sources without image-level classes (depth maps: every label -1) fall back to
one seeded permutation of all samples, unstratified but nested the same way.
Dense sources stratify on an image-level label their reader defines (COCO: the
category of the largest box; VOC: the class with the most pixels; scenes: the
largest item) and pass ``keep_unknown=True``, so images without an object,
which still have targets, form a stratum of their own.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from selftrain.atomic import atomic_write_text
from selftrain.data.sources import DataError


def labeled_subset(labels: np.ndarray, fraction: float, seed: int, *, keep_unknown: bool = False) -> np.ndarray:
    """Pick the indices that keep their labels.

    When any label is known (>= 0), each class ``c`` keeps the first
    ``max(1, round(fraction * n_c))`` of its samples in an order drawn from
    ``np.random.default_rng([seed, c])``; unknown samples (-1) are never
    picked, unless ``keep_unknown``. When no label is known, the first
    ``max(1, round(fraction * N))`` of one permutation of all samples, drawn
    from ``np.random.default_rng([seed])``, are picked.

    Args:
        labels: ``(N,)`` integer labels, -1 for unknown.
        fraction: Share to keep, ``0 < fraction <= 1``.
        seed: Non-negative integer seed.
        keep_unknown: The unknown samples form one more stratum, ordered by
            ``default_rng([seed])`` as in the all-unknown case, instead of
            never being picked (for dense sources, whose labels only stratify).

    Returns:
        Sorted ``int64`` indices.

    Raises:
        ValueError: Invalid fraction, seed or labels.
    """
    labels = _check_labels(labels)
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    if not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    known = labels >= 0
    if not known.any():
        if labels.size == 0:
            return np.empty(0, dtype=np.int64)
        order = np.random.default_rng([seed]).permutation(labels.size)
        return np.sort(order[: _take(fraction, labels.size)]).astype(np.int64)
    picked = []
    unknown = np.flatnonzero(~known)
    if keep_unknown and unknown.size:
        order = np.random.default_rng([seed]).permutation(unknown.size)
        picked.append(unknown[order[: _take(fraction, unknown.size)]])
    for c in np.unique(labels[known]):
        members = np.flatnonzero(labels == c)
        # One RNG per class: a class's order does not depend on other classes
        # or on the fraction, which is what makes the subsets nested.
        order = np.random.default_rng([seed, int(c)]).permutation(members.size)
        picked.append(members[order[: _take(fraction, members.size)]])
    return np.sort(np.concatenate(picked)).astype(np.int64)


def kshot_subset(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """``shots`` labeled samples per class (k-shot), nested in ``shots`` and with the label fractions.

    Each class takes the first ``min(shots, n_c)`` samples of the same per-class order
    :func:`labeled_subset` uses (``default_rng([seed, c])``), so the 1-shot subset is inside the
    5-shot one, and a k-shot subset is inside every fraction that keeps at least k of each class.
    Without known labels (regression targets), ``shots`` samples in all, from the first
    ``shots`` of the all-samples order.

    Raises:
        ValueError: ``shots`` below 1, or an invalid seed or labels.
    """
    labels = _check_labels(labels)
    if isinstance(shots, bool) or not isinstance(shots, numbers.Integral) or shots < 1:
        raise ValueError(f"shots must be a positive integer, got {shots!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    known = labels >= 0
    if not known.any():
        order = np.random.default_rng([int(seed)]).permutation(labels.size)
        return np.sort(order[: int(shots)]).astype(np.int64)
    picked = []
    for c in np.unique(labels[known]):
        members = np.flatnonzero(labels == c)
        order = np.random.default_rng([int(seed), int(c)]).permutation(members.size)
        picked.append(members[order[: int(shots)]])
    return np.sort(np.concatenate(picked)).astype(np.int64)


def _take(fraction: float, n: int) -> int:
    # round() is monotonic in `fraction`, so larger fractions take longer prefixes.
    return max(1, round(fraction * n))


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers (-1 = unknown), got dtype {labels.dtype}")
    labels = labels.astype(np.int64, copy=False)
    if labels.size and labels.min() < -1:
        raise ValueError(f"labels must be >= -1 (-1 = unknown), found {labels.min()}")
    return labels


def save_split(path: str | Path, keys: Sequence[str], meta: dict[str, Any]) -> None:
    """Write ``{"meta": meta, "keys": keys}`` as JSON, atomically.

    The file is written to a temporary name in the same directory, flushed and
    fsynced, then renamed over ``path``: readers see the old or the new split,
    never half of one, even if the process dies mid-write.

    Raises:
        ValueError: ``keys`` contains non-strings or duplicates.
        TypeError: ``meta`` is not a JSON-serializable dict.
    """
    path = Path(path)
    if not isinstance(meta, dict):
        raise TypeError(f"{path}: split meta must be a dict, got {type(meta).__name__}")
    keys = list(keys)
    bad = next((k for k in keys if not isinstance(k, str)), None)
    if bad is not None:
        raise ValueError(f"{path}: split keys must be strings, got {bad!r}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"{path}: split keys contain duplicates")
    # Serialize first so an unserializable meta leaves no temporary file behind.
    text = json.dumps({"meta": meta, "keys": keys}, ensure_ascii=False, indent=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text + "\n")


def load_split(path: str | Path) -> tuple[list[str], dict[str, Any]]:
    """Read a file written by :func:`save_split`.

    Returns:
        ``(keys, meta)``.

    Raises:
        DataError: Missing file, invalid JSON, or wrong structure; the message
            names the file.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"{path}: split file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read split file ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or "keys" not in data or "meta" not in data:
        raise DataError(f'{path}: not a split file (expected a JSON object with "meta" and "keys")')
    keys, meta = data["keys"], data["meta"]
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise DataError(f'{path}: "keys" must be a list of strings')
    if not isinstance(meta, dict):
        raise DataError(f'{path}: "meta" must be a JSON object')
    return keys, meta
