"""Face metrics against hand-computed values and naive references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selftrain.metrics_faces import (
    au_metrics,
    ccc,
    ced_auc,
    cosine_similarity,
    emotion_metrics,
    icc_3_1,
    interocular_distance,
    landmark_metrics,
    nme_3d,
    tar_at_far,
    verification_accuracy,
    verification_metrics,
)

# ------------------------------------------------------------------------------- verification


def test_verification_threshold_is_fitted_on_the_other_folds():
    # Fold 0 is tested with the threshold of fold 1 (0.8 same, 0.6 different -> 0.7): both right.
    # Fold 1 is tested with the threshold of fold 0 (0.9, 0.2 -> 0.55): its 0.6 impostor is accepted.
    result = verification_accuracy([0.9, 0.2, 0.8, 0.6], [True, False, True, False], folds=[0, 0, 1, 1])
    assert result["thresholds"] == pytest.approx([0.7, 0.55])
    assert result["folds"] == pytest.approx([100.0, 50.0])
    assert result["accuracy"] == pytest.approx(75.0)
    assert result["std"] == pytest.approx(25.0)


def test_verification_default_folds_are_contiguous_tenths():
    # 20 pairs, 10 folds of 2; perfectly separable scores give 100% whatever the fold.
    same = np.tile([True, False], 10)
    scores = np.where(same, 0.9, 0.1) + np.linspace(0, 0.01, 20)
    result = verification_accuracy(torch.tensor(scores), same)
    assert len(result["folds"]) == 10 and result["accuracy"] == 100.0
    with pytest.raises(ValueError, match="2 folds"):
        verification_accuracy([0.1, 0.2], [True, False], folds=[0, 0])


def test_tar_at_far_by_hand_and_against_a_threshold_sweep():
    genuine = [0.9, 0.8, 0.7, 0.4]
    impostor = [0.85, 0.6, 0.5, 0.3, 0.2, 0.1, 0.11, 0.05, 0.0, -0.1]
    scores = np.array(genuine + impostor)
    same = np.array([True] * 4 + [False] * 10)
    result = tar_at_far(scores, same, fars=(0.01, 0.1, 0.2, 1.0))
    # FAR 0.01 needs more than 10 impostors: not measurable. FAR 0.1 allows one false accept
    # (0.85), so the threshold sits at 0.6 and accepts 0.9, 0.8, 0.7 of the genuine pairs.
    assert result == pytest.approx({"tar@far=0.1": 75.0, "tar@far=0.2": 75.0, "tar@far=1": 100.0})
    # Naive reference: sweep every threshold, keep the best TAR whose FAR stays within the target.
    imp, gen = scores[~same], scores[same]
    for far in (0.1, 0.2, 0.3, 0.5):
        best = max((gen > t).mean() for t in np.append(scores, -np.inf) if (imp > t).mean() <= far)
        assert tar_at_far(scores, same, fars=(far,))[f"tar@far={far:g}"] == pytest.approx(100 * best)


def test_verification_metrics_from_embeddings():
    # Images 0, 1 point the same way (cosine 1), 2 is orthogonal to them (0), 3 opposite to 0 (-1).
    embeddings = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    a, b = [0, 0, 1, 0], [1, 2, 3, 3]
    same = [True, False, True, False]  # the third pair (cosine -1) is a genuine pair the embedding misses
    # Fold 0 (scores 1, 0) is tested with fold 1's threshold (-1 same, -1 different: -2, all "same") -> 50%;
    # fold 1 (-1 same, -1 different) with fold 0's (0.5) -> both "different" -> 50%.
    result = verification_metrics(embeddings, a, b, same, folds=[0, 0, 1, 1], fars=(0.5,))
    assert result == pytest.approx({"accuracy": 50.0, "accuracy_std": 0.0, "tar@far=0.5": 50.0})


def test_cosine_similarity():
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[0.0, 2.0], [2.0, 2.0]])
    assert cosine_similarity(a, b).tolist() == pytest.approx([0.0, 1.0])
    with pytest.raises(ValueError, match="all zeros"):
        cosine_similarity(np.zeros((1, 2)), b[:1])


# ----------------------------------------------------------------------------------- landmarks


def _faces(num_points: int, left: int, right: int) -> np.ndarray:
    target = np.random.default_rng(0).uniform(0, 10, size=(2, num_points, 2))
    target[:, left], target[:, right] = (3.0, 5.0), (13.0, 5.0)  # inter-ocular distance 10
    return target


def test_landmark_metrics_by_hand():
    target = _faces(68, 36, 45)
    # Face 0 is off by (0.3, 0.4) everywhere: error 0.5, NME 0.05. Face 1 by (1.2, 1.6): NME 0.2, a failure.
    pred = target + np.array([[[0.3, 0.4]], [[1.2, 1.6]]])
    result = landmark_metrics(pred, target)
    # AUC@0.08 = mean(max(0, 0.08 - e)) / 0.08 = (0.03 + 0) / 2 / 0.08 = 0.1875
    assert result == pytest.approx({"nme": 12.5, "failure_rate": 50.0, "auc": 18.75})
    assert interocular_distance(_faces(98, 60, 72)).tolist() == pytest.approx([10.0, 10.0])
    # A third (visibility) column is ignored; a face exactly at the threshold does not fail.
    with_v = np.concatenate([target, np.ones((2, 68, 1))], axis=2)
    assert landmark_metrics(target + np.array([0.6, 0.8]), with_v)["failure_rate"] == 0.0


def test_ced_auc_matches_a_fine_trapezoid():
    errors = np.random.default_rng(1).uniform(0, 0.12, size=50)
    grid = np.linspace(0, 0.08, 80001)
    ced = (errors[None, :] <= grid[:, None]).mean(axis=1)
    assert ced_auc(errors, 0.08) == pytest.approx(np.trapezoid(ced, grid) / 0.08, abs=1e-4)


def test_nme_3d_normalises_by_the_projected_box():
    target = np.zeros((1, 68, 3))
    target[0, :, 0] = np.linspace(0, 4, 68)  # box 4 wide
    target[0, :, 1] = np.linspace(0, 9, 68)  # and 9 high: sqrt(w h) = 6
    pred = target + np.array([0.0, 0.0, 3.0])  # 3 off in depth only
    assert nme_3d(pred, target) == pytest.approx({"nme": 50.0})
    assert nme_3d(pred[..., :2], target[..., :2]) == pytest.approx({"nme": 0.0})


# --------------------------------------------------------------------------- AU intensity, emotion


def test_icc_3_1_of_shrout_and_fleiss_table_2():
    # Shrout & Fleiss (1979), Table 2: 6 targets, 4 judges; they report ICC(3,1) = .71.
    ratings = [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]]
    assert icc_3_1(ratings) == pytest.approx(0.71, abs=0.005)


def test_icc_3_1_by_hand():
    # Consistency ignores a constant offset between raters.
    assert icc_3_1([[1, 2], [2, 3], [3, 4]]) == pytest.approx(1.0)
    # grand mean 2; BMS = 2 * (1 + .25 + .25) / 2 = 1.5; rater SS 0; residual 4 - 3 = 1, EMS = 0.5
    assert icc_3_1([[1, 1], [2, 3], [3, 2]]) == pytest.approx((1.5 - 0.5) / (1.5 + 0.5))
    with pytest.raises(ValueError, match="undefined"):
        icc_3_1([[1, 1], [1, 1]])


def test_au_metrics_per_au_and_mean():
    target = np.array([[1, 0], [2, 3], [3, 4]], dtype=float)
    pred = np.array([[2, 1], [3, 3], [4, 2]], dtype=float)  # AU A: +1 offset (ICC 1, MAE 1)
    out = au_metrics(pred, target, names=["AU1", "AU2"])
    assert out["icc/AU1"] == pytest.approx(1.0) and out["mae/AU1"] == pytest.approx(1.0)
    assert out["mae/AU2"] == pytest.approx(1.0)
    assert out["icc/AU2"] == pytest.approx(icc_3_1(np.stack([pred[:, 1], target[:, 1]], axis=1)))
    assert out["icc"] == pytest.approx((1.0 + out["icc/AU2"]) / 2) and out["mae"] == pytest.approx(1.0)


def test_ccc_by_hand():
    # means 2.5, 3.25; variances 1.25, 1.1875; covariance 1.125; 2 * 1.125 / (1.25 + 1.1875 + 0.5625) = 0.75
    assert ccc([1, 2, 3, 4], [2, 3, 3, 5]) == pytest.approx(0.75)
    assert ccc([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert ccc([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_emotion_metrics():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [0.0, 5.0, 1.0], [1.0, 0.0, 0.0]])
    va = np.array([[1, 2], [2, 3], [3, 3], [4, 5]], dtype=float) / 5
    target_va = np.array([[2, 1], [3, 2], [3, 3], [5, 4]], dtype=float) / 5
    out = emotion_metrics(logits, [0, 2, 1, 1], va, target_va)  # argmax 0, 2, 1, 0
    assert out["accuracy"] == pytest.approx(75.0)
    assert out["ccc_valence"] == pytest.approx(ccc([1, 2, 3, 4], [2, 3, 3, 5]))  # 0.75, scale-free
    assert out["ccc_arousal"] == pytest.approx(ccc([2, 3, 3, 5], [1, 2, 3, 4]))
    assert out["mae_valence"] == pytest.approx(0.15)
    assert emotion_metrics(np.array([0, 2]), [0, 1]) == {"accuracy": 50.0}
