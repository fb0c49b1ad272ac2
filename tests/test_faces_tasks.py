"""The face tasks: shapes, finite losses with gradients, metrics against metrics_faces, store round trips."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from selftrain.config import ConfigError, build_config
from selftrain.data import kshot_subset, labeled_subset
from selftrain.data.annotations.face_landmarks import FLIP_PAIRS_98
from selftrain.data.face_fixtures import face_points
from selftrain.network import Network, NetworkSpec
from selftrain.tasks import TASKS

SHAPE = {"width": 0.85, "height": 0.95, "eyes": 0.36}


def _net(task: str, size: int) -> Network:
    return Network(NetworkSpec("cnn-tiny", size, 3, 32, [0.5] * 3, [0.25] * 3, task=task))


def _targets(task: str, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    if task == "landmarks":
        return [{"keypoints": torch.cat([torch.rand(68, 2, generator=g) * 32, torch.ones(68, 1)], 1)} for _ in range(n)]
    if task == "au":
        return [{"au": torch.rand(6, generator=g) * 5} for _ in range(n)]
    if task == "emotion":
        return [{"probs": torch.eye(8)[k % 8], "valence_arousal": torch.rand(2, generator=g) * 2 - 1} for k in range(n)]
    return [{"points3d": torch.rand(68, 3, generator=g) * 32} for _ in range(n)]


@pytest.mark.parametrize("task,size", [("landmarks", 68), ("au", 6), ("emotion", 8), ("alignment3d", 68)])
def test_loss_backward_metric_and_store_round_trip(task: str, size: int) -> None:
    torch.manual_seed(0)
    net, t = _net(task, size), TASKS.get(task)(size)
    x = torch.rand(4, 3, 32, 32)
    outputs = net(x)
    targets = _targets(task, 4)
    loss = t.loss(outputs, targets)
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert all(p.grad is not None for p in net.head.parameters())
    meter = t.build_metric()
    meter.update(t.predict(outputs), targets)
    assert t.metric in meter.compute()
    label_cfg = build_config({"task": task}).label
    columns = t.encode_records(outputs.detach(), label_cfg)
    table = pa.table({k: pa.array(v, type=t.pseudo_schema()[k]) for k, v in columns.items()})
    decoded = t.decode_rows(table)
    encoded, _ = t.pseudo_targets(outputs.detach(), label_cfg)
    for a, b in zip(decoded, encoded):
        for key in b:
            torch.testing.assert_close(a[key], b[key].float())


def test_landmark_metric_is_interocular_nme() -> None:
    """Every point off by 1 px, eye corners 36/45 10 px apart: NME 10%, all at the failure line."""
    truth = torch.zeros(2, 68, 3)
    truth[:, 45, 0] = 10.0
    pred = truth.clone()
    pred[..., 0] += 1.0
    meter = TASKS.get("landmarks")(68).build_metric()
    meter.update([{"keypoints": p} for p in pred], [{"keypoints": p} for p in truth])
    out = meter.compute()
    assert out["nme"] == pytest.approx(10.0)
    assert out["failure_rate"] == 0.0  # a face fails when NME > 10%
    assert out["auc"] == pytest.approx(0.0)  # 0.08 - 0.10 < 0


def test_alignment3d_augment_flip_swaps_pairs_and_keeps_z() -> None:
    from selftrain.augment import BatchAugment

    t = TASKS.get("alignment3d")(68, flip_pairs=[(36, 45)])
    points = torch.zeros(1, 68, 3)
    points[0, 36] = torch.tensor([8.0, 10.0, 3.0])
    points[0, 45] = torch.tensor([24.0, 10.0, 5.0])
    torch.manual_seed(0)
    aug = BatchAugment("S1")
    for _ in range(20):  # until the random flip happens
        images, out = t.augment(aug, torch.rand(1, 3, 32, 32), [{"points3d": points[0]}])
        det = torch.linalg.det(aug.geometric.transform_matrix[0, :2, :2])
        if det < 0:
            p = out[0]["points3d"]
            assert p[36, 0] < p[45, 0]  # the left one is still on the left
            scale = det.abs().sqrt()
            assert p[36, 2] == pytest.approx(5.0 * float(scale), rel=1e-4)  # z followed its point
            return
    pytest.fail("no flip in 20 draws")


def test_verification_takes_pseudo_labels_from_an_embedding_teacher_only() -> None:
    t = TASKS.get("verification")(5)
    with pytest.raises(ValueError, match="embedding teacher only"):
        t.pseudo_targets(torch.zeros(2, 5 + t.dim), None)  # a trained verification network is no teacher
    with pytest.raises(ConfigError, match="verification learns pseudo labels from an embedding teacher only"):
        build_config({"task": "verification"})
    build_config({"task": "verification", "stages": ["teach", "transfer"]})
    build_config({"task": "verification", "label": {"teacher": "dlib:embedding"}})


def test_verification_loss_and_pairs_metric() -> None:
    from selftrain.data.annotations.faces import PairSet

    torch.manual_seed(0)
    net, t = _net("verification", 4), TASKS.get("verification")(4)
    outputs = net(torch.rand(6, 3, 32, 32))
    loss = t.loss(outputs, [{"labels": torch.tensor(k % 4)} for k in range(6)])
    assert loss.shape == (6,) and torch.isfinite(loss).all()
    emb = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]])
    pairs = PairSet([None] * 4, np.array([0, 2, 0, 1]), np.array([1, 3, 2, 3]), np.array([True, True, False, False]),
                    np.array([0, 1, 0, 1]))  # fmt: skip
    meter = t.build_metric()
    meter.dim = 2
    meter.update([{"embedding": e} for e in emb], [{"index": i, "pairs": pairs} for i in range(4)])
    assert meter.compute()["accuracy"] == pytest.approx(100.0)


def test_kshot_subsets_are_nested_and_inside_the_fractions() -> None:
    labels = np.repeat(np.arange(4), 25)
    one, five = kshot_subset(labels, 1, 3), kshot_subset(labels, 5, 3)
    assert len(one) == 4 and len(five) == 20 and set(one) <= set(five)
    assert set(five) <= set(labeled_subset(labels, 0.2, 3)) <= set(labeled_subset(labels, 0.5, 3))
    regression = np.full(50, -1)
    assert set(kshot_subset(regression, 2, 0)) <= set(kshot_subset(regression, 7, 0))
    with pytest.raises(ValueError, match="shots"):
        kshot_subset(labels, 0, 0)


@pytest.mark.parametrize("layout,pairs", [(98, FLIP_PAIRS_98)])
def test_generated_98_points_mirror_onto_their_flip_pairs(layout: int, pairs) -> None:
    """The fixtures' left/right order matches WFLW's flip pairs: mirroring x maps each point onto its pair."""
    p = face_points(layout, SHAPE, 0.0, 0.0, 0.0)
    assert len(p) == layout
    mirrored = p.copy()
    mirrored[:, 0] *= -1
    for a, b in pairs:
        np.testing.assert_allclose(mirrored[a, :2], p[b, :2], atol=1e-9)
