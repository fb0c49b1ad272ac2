"""Metrics of the face benchmark (Bulat et al. 2021): verification, landmarks, AUs, emotion, 3D.

==================  ==========================================  ====================================
task                function                                    values
==================  ==========================================  ====================================
verification        :func:`verification_metrics`                ``accuracy`` (10-fold, %) and its
                    (:func:`verification_accuracy`,             ``std``; ``tar@far=0.001`` ... (%)
                    :func:`tar_at_far`)
2D landmarks        :func:`landmark_metrics`                    ``nme``, ``failure_rate``, ``auc``
                                                                (all %)
AU intensity        :func:`au_metrics`, :func:`icc_3_1`         ``icc`` (mean over AUs), ``mae``,
                                                                and per AU
emotion             :func:`emotion_metrics`, :func:`ccc`        ``accuracy`` (%), ``ccc_valence``,
                                                                ``ccc_arousal``
3D alignment        :func:`nme_3d`                              ``nme`` (%)
==================  ==========================================  ====================================

Every function takes whole evaluation sets (NumPy arrays or tensors, computed in float64): these
metrics need every score at once (thresholds chosen across folds, ROC curves, variances), so
they are not batch accumulators like the dense metrics in :mod:`selftrain.metrics`. Each is
checked against hand-computed values in ``tests/test_faces_metrics.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

#: Outer eye corners used for the inter-ocular distance: 68-point iBUG/300W (0-based) and 98-point WFLW.
INTEROCULAR = {68: (36, 45), 98: (60, 72)}
#: AffectNet's eight expression codes 0-7, in code order.
EXPRESSIONS = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt")


def _array(values: Any, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    out = np.asarray(values, dtype=np.float64)
    if not np.isfinite(out).all():
        raise ValueError(f"{name} has NaN or infinite values")
    return out


# ------------------------------------------------------------------------------- verification


def cosine_similarity(a: Any, b: Any) -> np.ndarray:
    """Row-wise cosine similarity of two ``(N, D)`` embedding sets: the score of each pair."""
    a, b = _array(a, "a"), _array(b, "b")
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"embeddings must both be (N, D), got {a.shape} and {b.shape}")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    if (norms == 0).any():
        raise ValueError("an embedding is all zeros: its cosine similarity is undefined")
    return (a * b).sum(axis=1) / norms


def _best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold ``t`` (pairs with ``score > t`` are called "same") of highest accuracy.

    Candidates are the midpoints between consecutive distinct scores, and one below the lowest
    and one above the highest, so every distinct decision is tried exactly once. Ties go to the
    lowest threshold.
    """
    distinct = np.unique(scores)
    candidates = np.concatenate([[distinct[0] - 1.0], (distinct[:-1] + distinct[1:]) / 2, [distinct[-1] + 1.0]])
    correct = [((scores > t) == same).sum() for t in candidates]
    return float(candidates[int(np.argmax(correct))])


def verification_accuracy(scores: Any, same: Any, folds: Any = None, n_folds: int = 10) -> dict[str, Any]:
    """Pair verification accuracy with the LFW protocol: a threshold fitted on 9 folds, tested on the 10th.

    For each fold, the threshold that maximises accuracy on the other folds (see
    :func:`_best_threshold`) classifies the fold's pairs (``score > t`` = same person); the result
    is the mean and standard deviation of the per-fold accuracies (Huang et al. 2007, "LFW",
    "unrestricted" protocol as every face-recognition paper reports it).

    Args:
        scores: ``(N,)`` similarity of each pair (higher = more alike; use ``-distance`` for distances).
        same: ``(N,)`` bool, whether the pair shows one person.
        folds: ``(N,)`` fold index of each pair (as :func:`selftrain.data.annotations.faces.read_pairs`
            gives it); default: ``n_folds`` contiguous folds of the given order, as LFW's file has them.
        n_folds: Folds when ``folds`` is not given.

    Returns:
        ``{"accuracy": mean %, "std": %, "thresholds": [t per fold], "folds": [accuracy % per fold]}``.
    """
    scores, same = _array(scores, "scores"), np.asarray(same, dtype=bool)
    if scores.ndim != 1 or same.shape != scores.shape:
        raise ValueError(f"scores {scores.shape} and same {same.shape} must both be (N,)")
    if folds is None:
        folds = np.arange(len(scores)) * n_folds // max(len(scores), 1)
    folds = np.asarray(folds)
    if folds.shape != scores.shape:
        raise ValueError(f"folds {folds.shape} must be (N,) like scores")
    ids = np.unique(folds)
    if len(ids) < 2:
        raise ValueError("verification accuracy needs at least 2 folds (thresholds are fitted on the others)")
    accuracies, thresholds = [], []
    for fold in ids:
        test = folds == fold
        threshold = _best_threshold(scores[~test], same[~test])
        thresholds.append(threshold)
        accuracies.append(100.0 * float(((scores[test] > threshold) == same[test]).mean()))
    return {"accuracy": float(np.mean(accuracies)), "std": float(np.std(accuracies)),
            "thresholds": thresholds, "folds": accuracies}  # fmt: skip


def tar_at_far(scores: Any, same: Any, fars: Sequence[float] = (1e-3, 1e-2, 1e-1)) -> dict[str, float]:
    """True accept rate at fixed false accept rates, read exactly off the ROC curve.

    ``TAR@FAR=f`` is the largest fraction of genuine pairs accepted by a threshold that accepts at
    most ``floor(f * n_impostor)`` impostor pairs (``score > t`` accepts). A FAR under
    ``1 / n_impostor`` cannot be measured with these pairs and is left out of the result (LFW's
    3,000 impostor pairs allow 1e-3, not 1e-4).

    Returns:
        ``{"tar@far=0.001": %, ...}`` for the measurable ``fars``.
    """
    scores, same = _array(scores, "scores"), np.asarray(same, dtype=bool)
    genuine, impostor = scores[same], np.sort(scores[~same])[::-1]
    if len(genuine) == 0 or len(impostor) == 0:
        raise ValueError("TAR@FAR needs both genuine and impostor pairs")
    out = {}
    for far in fars:
        allowed = int(np.floor(far * len(impostor) + 1e-9))
        if far <= 0 or allowed < 1:
            continue
        # Accepting `allowed` impostors at most: the threshold must not be below the next one's score.
        tar = 1.0 if allowed >= len(impostor) else float((genuine > impostor[allowed]).mean())
        out[f"tar@far={far:g}"] = 100.0 * tar
    return out


def verification_metrics(
    embeddings: Any, a: Any, b: Any, same: Any, folds: Any = None, fars: Sequence[float] = (1e-3, 1e-2, 1e-1)
) -> dict[str, float]:
    """Verification of a pair set from one embedding per image: cosine scores, 10-fold accuracy, TAR@FAR.

    Args:
        embeddings: ``(M, D)``, one row per distinct image.
        a, b, same, folds: Per pair, the rows of its two images, whether they show one person, and
            its fold (:class:`selftrain.data.annotations.PairSet` has all four).

    Returns:
        ``{"accuracy": %, "accuracy_std": %, "tar@far=...": %, ...}``.
    """
    embeddings = _array(embeddings, "embeddings")
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    scores = cosine_similarity(embeddings[a], embeddings[b])
    accuracy = verification_accuracy(scores, same, folds)
    return {"accuracy": accuracy["accuracy"], "accuracy_std": accuracy["std"], **tar_at_far(scores, same, fars)}


# ----------------------------------------------------------------------------------- landmarks


def interocular_distance(target: Any, corners: tuple[int, int] | None = None) -> np.ndarray:
    """Per-face distance between the outer eye corners (68 points: 36 and 45; 98 points: 60 and 72).

    Args:
        target: ``(N, P, 2+)`` ground-truth points.
        corners: The two point indices; default from :data:`INTEROCULAR` by ``P``.
    """
    target = _array(target, "target")
    if corners is None:
        if target.shape[1] not in INTEROCULAR:
            raise ValueError(f"no standard eye corners for {target.shape[1]} points; pass corners=(i, j)")
        corners = INTEROCULAR[target.shape[1]]
    i, j = corners
    return np.linalg.norm(target[:, i, :2] - target[:, j, :2], axis=1)


def landmark_nme_per_face(pred: Any, target: Any, norm: Any) -> np.ndarray:
    """``(N,)`` mean point-to-point error of each face divided by its ``norm`` (a ratio, not %)."""
    pred, target, norm = _array(pred, "pred"), _array(target, "target"), _array(norm, "norm")
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"pred {pred.shape} and target {target.shape} must both be (N, P, D)")
    norm = np.broadcast_to(norm, (pred.shape[0],))
    if (norm <= 0).any():
        raise ValueError(f"faces {np.flatnonzero(norm <= 0)[:5].tolist()} have a norm <= 0")
    return np.linalg.norm(pred - target, axis=2).mean(axis=1) / norm


def ced_auc(errors: Any, limit: float = 0.08) -> float:
    """Area under the cumulative error distribution up to ``limit``, divided by ``limit`` (0..1).

    ``CED(e)`` is the fraction of faces with error ``<= e``; its integral from 0 to ``limit``
    is exactly ``mean_i max(0, limit - e_i)`` (each face adds ``limit - e_i`` once it is
    counted), so no sampling grid is needed (grids of 1e-4 steps, as in most face-alignment code,
    approximate this value).
    """
    errors = _array(errors, "errors")
    if limit <= 0:
        raise ValueError(f"limit must be > 0, got {limit}")
    return float(np.clip(limit - errors, 0.0, None).mean() / limit)


def landmark_metrics(
    pred: Any,
    target: Any,
    *,
    norm: Any = None,
    failure_threshold: float = 0.10,
    auc_limit: float = 0.08,
) -> dict[str, float]:
    """NME, failure rate and AUC of the CED curve for 2D face landmarks (300W / WFLW conventions).

    ``NME_i = mean_p ||pred_ip - target_ip|| / d_i`` with ``d_i`` the inter-ocular (outer eye
    corner) distance by default; a face fails when ``NME_i > failure_threshold``; ``auc`` is
    :func:`ced_auc` at ``auc_limit``.

    Args:
        pred, target: ``(N, P, 2)`` points (a third column, such as visibility, is ignored).
        norm: ``(N,)`` or scalar normaliser; default :func:`interocular_distance` of ``target``.

    Returns:
        ``{"nme", "failure_rate", "auc"}``, all in percent.
    """
    pred, target = _array(pred, "pred")[..., :2], _array(target, "target")[..., :2]
    norm = interocular_distance(target) if norm is None else norm
    errors = landmark_nme_per_face(pred, target, norm)
    return {
        "nme": 100.0 * float(errors.mean()),
        "failure_rate": 100.0 * float((errors > failure_threshold).mean()),
        "auc": 100.0 * ced_auc(errors, auc_limit),
    }


def nme_3d(pred: Any, target: Any) -> dict[str, float]:
    """NME of 3D face alignment as on AFLW2000-3D (Zhu et al. 2016, 3DDFA).

    The per-face error is the mean point-to-point distance over the coordinates given (pass
    ``[..., :2]`` for the 2D-projected error most AFLW2000-3D tables report), divided by
    ``sqrt(w * h)`` of the bounding box of the target's ``x, y`` (the 2D projection).

    Args:
        pred, target: ``(N, 68, D)`` points, ``D`` = 2 or 3.

    Returns:
        ``{"nme": %}``.
    """
    target = _array(target, "target")
    extent = target[..., :2].max(axis=1) - target[..., :2].min(axis=1)  # (N, 2): w, h
    return {"nme": 100.0 * float(landmark_nme_per_face(pred, target, np.sqrt(extent.prod(axis=1))).mean())}


# --------------------------------------------------------------------------- AU intensity, emotion


def icc_3_1(ratings: Any) -> float:
    """ICC(3,1) of Shrout & Fleiss (1979): two-way mixed, consistency, single rater.

    ``(BMS - EMS) / (BMS + (k - 1) EMS)`` for ``n`` targets rated by ``k`` raters, with BMS the
    between-targets mean square and EMS the residual mean square of the two-way ANOVA. For AU
    intensity the two "raters" are the prediction and the ground truth.

    Args:
        ratings: ``(n, k)`` array, one row per target.
    """
    x = _array(ratings, "ratings")
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 2:
        raise ValueError(f"ratings must be (n, k) with n, k >= 2, got {x.shape}")
    n, k = x.shape
    grand = x.mean()
    between = k * ((x.mean(axis=1) - grand) ** 2).sum()  # targets
    raters = n * ((x.mean(axis=0) - grand) ** 2).sum()
    residual = ((x - grand) ** 2).sum() - between - raters
    bms, ems = between / (n - 1), residual / ((n - 1) * (k - 1))
    denominator = bms + (k - 1) * ems
    if denominator == 0:
        raise ValueError("ICC is undefined: every rating is the same")
    return float((bms - ems) / denominator)


def au_metrics(pred: Any, target: Any, names: Sequence[str] | None = None) -> dict[str, float]:
    """ICC(3,1) and MAE of action-unit intensities (DISFA / BP4D convention: per AU, then averaged).

    Args:
        pred, target: ``(N, K)`` intensities (0-5) of ``K`` AUs.
        names: AU names for the per-AU keys (default ``au0``, ``au1``, ...).

    Returns:
        ``{"icc": mean, "mae": mean, "icc/AU1": ..., "mae/AU1": ..., ...}``.
    """
    pred, target = _array(pred, "pred"), _array(target, "target")
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"pred {pred.shape} and target {target.shape} must both be (N, K)")
    names = list(names) if names is not None else [f"au{k}" for k in range(pred.shape[1])]
    if len(names) != pred.shape[1]:
        raise ValueError(f"{len(names)} names for {pred.shape[1]} AUs")
    out: dict[str, float] = {}
    for k, name in enumerate(names):
        out[f"icc/{name}"] = icc_3_1(np.stack([pred[:, k], target[:, k]], axis=1))
        out[f"mae/{name}"] = float(np.abs(pred[:, k] - target[:, k]).mean())
    out["icc"] = float(np.mean([out[f"icc/{n}"] for n in names]))
    out["mae"] = float(np.abs(pred - target).mean())
    return out


def ccc(pred: Any, target: Any) -> float:
    """Lin's concordance correlation coefficient, ``2 cov / (var_p + var_t + (mean_p - mean_t)^2)``.

    Population (1/N) moments, as in the AffectNet and AVEC evaluations.
    """
    p, t = _array(pred, "pred").ravel(), _array(target, "target").ravel()
    if p.shape != t.shape or p.size < 2:
        raise ValueError(f"pred and target must be equal-length vectors of >= 2 values, got {p.size} and {t.size}")
    covariance = ((p - p.mean()) * (t - t.mean())).mean()
    denominator = p.var() + t.var() + (p.mean() - t.mean()) ** 2
    if denominator == 0:
        raise ValueError("CCC is undefined: both series are the same constant")
    return float(2 * covariance / denominator)


def emotion_metrics(
    logits: Any = None, labels: Any = None, valence_arousal: Any = None, target_valence_arousal: Any = None
) -> dict[str, float]:
    """Expression accuracy and valence/arousal CCC (AffectNet), for whichever parts are given.

    Args:
        logits: ``(N, C)`` class scores, or ``(N,)`` predicted classes.
        labels: ``(N,)`` expression codes.
        valence_arousal, target_valence_arousal: ``(N, 2)`` predicted and true valence, arousal.

    Returns:
        ``accuracy`` (%) when classes are given; ``ccc_valence``, ``ccc_arousal`` (and ``mae_*``)
        when valence/arousal are.
    """
    out: dict[str, float] = {}
    if logits is not None:
        scores = _array(logits, "logits")
        predicted = scores.argmax(axis=1) if scores.ndim == 2 else scores
        labels = _array(labels, "labels")
        if predicted.shape != labels.shape:
            raise ValueError(f"{predicted.shape[0]} predictions but labels {labels.shape}")
        out["accuracy"] = 100.0 * float((predicted == labels).mean())
    if valence_arousal is not None:
        pred, target = _array(valence_arousal, "valence_arousal"), _array(target_valence_arousal, "target")
        if pred.shape != target.shape or pred.ndim != 2 or pred.shape[1] != 2:
            raise ValueError(f"valence/arousal must both be (N, 2), got {pred.shape} and {target.shape}")
        for k, name in enumerate(("valence", "arousal")):
            out[f"ccc_{name}"] = ccc(pred[:, k], target[:, k])
            out[f"mae_{name}"] = float(np.abs(pred[:, k] - target[:, k]).mean())
    return out
