"""Detection task: head shapes, FCOS assignment, per-image losses, NMS, pseudo boxes, a tiny overfit."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import nn

from selftrain.tasks import TASKS
from selftrain.tasks.detection import Detection, assign_locations

FMNIST = Path("/usr/share/datasets/fashion-mnist")
K = 11


class StandInBackbone(nn.Module):
    """The feature-backbone interface (maps fine to coarse, ``channels``, ``strides``), cnn-tiny sized."""

    def __init__(self, in_chans: int = 1) -> None:
        super().__init__()
        self.channels, self.strides = [8, 16, 32], [1, 2, 4]

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.stages = nn.ModuleList([block(in_chans, 8, 1), block(8, 16, 2), block(16, 32, 2)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps


def _model(task: Detection, backbone: nn.Module | None = None) -> tuple[nn.Module, nn.Module]:
    backbone = backbone or StandInBackbone()
    return backbone, task.build_head(backbone.channels, backbone.strides)


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[8.0, 8.0, 30.0, 34.0], [30.0, 20.0, 60.0, 60.0]]), "labels": torch.tensor([3, 10])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]


@pytest.fixture(scope="module")
def task() -> Detection:
    torch.manual_seed(0)
    return Detection(num_classes=K)


def test_registered_and_attributes():
    assert TASKS.get("detection") is Detection
    assert (Detection.name, Detection.metric, Detection.higher_is_better) == ("detection", "ap", True)


def test_output_shapes(task):
    backbone, head = _model(task)
    out = head(backbone(torch.randn(2, 1, 64, 64)))
    n = 32 * 32 + 16 * 16 + 8 * 8  # strides 2 and 4 (stride 1 is below min_stride) + the pooled stride-8 level
    assert out["cls_logits"].shape == (2, n, K)
    assert out["bbox_regression"].shape == (2, n, 4)
    assert out["centerness"].shape == (2, n)
    assert out["points"].shape == (n, 2) and out["strides"].shape == (n,)
    assert out["image_size"].tolist() == [64, 64]
    assert sorted(set(out["strides"].tolist())) == [2.0, 4.0, 8.0]
    assert (out["bbox_regression"] >= 0).all()


def test_loss_per_image_finite_with_empty_image(task):
    backbone, head = _model(task)
    out = head(backbone(torch.randn(2, 1, 64, 64)))
    loss = task.loss(out, _targets())
    assert loss.shape == (2,) and torch.isfinite(loss).all() and (loss > 0).all()
    loss.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)
    # The empty image's loss is the plain focal loss over all its locations (everything negative).
    from torchvision.ops import sigmoid_focal_loss

    logits = out["cls_logits"][1].detach()
    expected = sigmoid_focal_loss(logits, torch.zeros_like(logits), reduction="sum")
    torch.testing.assert_close(loss[1].detach(), expected)


def test_scores_weigh_pseudo_boxes(task):
    backbone, head = _model(task)
    with torch.no_grad():
        out = head(backbone(torch.randn(1, 1, 64, 64)))
    target = _targets()[0]
    full = task.loss(out, [{**target, "scores": torch.ones(2)}])
    plain = task.loss(out, [target])
    low = task.loss(out, [{**target, "scores": torch.tensor([0.2, 0.2])}])
    torch.testing.assert_close(full, plain)
    assert low < plain


def test_assignment_centre_positive_far_negative(task):
    backbone, head = _model(task)
    out = head(backbone(torch.randn(1, 1, 64, 64)))
    points, strides = out["points"], out["strides"]
    box = torch.tensor([[16.0, 16.0, 48.0, 48.0]])
    matched = assign_locations(points, strides, box)
    pos = matched >= 0
    assert pos.any() and (matched[pos] == 0).all()
    # Positives lie inside the box, near its centre (centre sampling radius 1.5 strides).
    assert ((points[pos] - 32).abs().amax(dim=1) < 1.5 * strides[pos]).all()
    # The location nearest the centre on the level whose range holds the box (max side distance ~16 px
    # -> stride 4: (16, 32]) is positive; a location in the far corner is not.
    on_level = strides == 4
    centre = ((points - 32).abs().sum(1) + 1e6 * ~on_level).argmin()
    assert pos[centre]
    far = ((points - torch.tensor([62.0, 62.0])).abs().sum(1)).argmin()
    assert not pos[far]
    # Smallest box wins where boxes overlap; no boxes -> all background.
    nested = torch.tensor([[0.0, 0.0, 64.0, 64.0], [24.0, 24.0, 40.0, 40.0]])
    m = assign_locations(points, strides, nested)
    near_small = ((points - 32).abs().amax(1) < 2) & (strides == 2)
    assert (m[near_small] == 1).all()
    assert (assign_locations(points, strides, torch.zeros(0, 4)) == -1).all()


def _handmade_outputs(task: Detection, regression: torch.Tensor, logit: torch.Tensor) -> dict[str, torch.Tensor]:
    """Two locations of stride 8 (reference boxes of side 8) on a 64 px image."""
    cls = torch.full((1, 2, K), -10.0)
    cls[0, :, 2] = logit
    return {
        "cls_logits": cls,
        "bbox_regression": regression[None],
        "centerness": torch.full((1, 2), 10.0),
        "points": torch.tensor([[20.0, 20.0], [21.0, 20.0]]),
        "strides": torch.tensor([8.0, 8.0]),
        "image_size": torch.tensor([64, 64]),
    }


def test_predict_nms_removes_duplicate(task):
    # Both locations decode to boxes of class 2 with side distances 1 stride = 8 px, one pixel apart (IoU ~0.88).
    reg = torch.ones(2, 4)
    out = _handmade_outputs(task, reg, torch.tensor([3.0, 2.0]))
    (pred,) = task.predict(out, nms_iou=0.6)
    assert len(pred["boxes"]) == 1
    torch.testing.assert_close(pred["boxes"][0], torch.tensor([12.0, 12.0, 28.0, 28.0]))
    assert pred["labels"].tolist() == [2] and pred["labels"].dtype == torch.int64
    assert pred["boxes"].dtype == torch.float32 and pred["scores"].dtype == torch.float32
    (both,) = task.predict(out, nms_iou=0.99)
    assert len(both["boxes"]) == 2 and both["scores"][0] >= both["scores"][1]


def test_encode_pseudo_threshold_keeps_scores(task):
    reg = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 3.0, 3.0]])  # two distinct boxes
    out = _handmade_outputs(task, reg, torch.tensor([3.0, -1.0]))  # sqrt(sigmoid) ~ 0.976 and ~0.52
    expected = torch.sqrt(torch.sigmoid(torch.tensor([3.0, -1.0])) * torch.sigmoid(torch.tensor(10.0)))
    (high,) = task.encode_pseudo(out, threshold=0.9)
    torch.testing.assert_close(high["scores"], expected[:1])
    (both,) = task.encode_pseudo(out)  # default 0.5
    torch.testing.assert_close(both["scores"], expected)
    assert set(both) == {"boxes", "labels", "scores"} and both["labels"].tolist() == [2, 2]
    (none,) = task.encode_pseudo(out, threshold=0.99)
    assert none["boxes"].shape == (0, 4) and none["scores"].shape == (0,)


def test_metric_accumulates(task):
    meter = task.build_metric()
    targets = _targets()
    perfect = [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))} for t in targets]
    meter.update(perfect[:1], targets[:1])
    meter.update(perfect[1:], targets[1:])
    result = meter.compute()
    assert result["ap"] == pytest.approx(100.0) and result["ap50"] == pytest.approx(100.0)


def _scenes(n: int) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    from selftrain.data.sources import build_source

    source = build_source(f"scenes:train?n={n}&size=64")
    images = source.load_batch(range(n)).float() / 255.0
    targets = [{k: v for k, v in source.load_targets(i).items() if k in ("boxes", "labels")} for i in range(n)]
    return images, targets


def _overfit(backbone: nn.Module, steps: int) -> tuple[float, float, float]:
    torch.manual_seed(0)
    images, targets = _scenes(8)
    task = Detection(num_classes=K)
    head = task.build_head(backbone.channels, backbone.strides)
    model = nn.ModuleDict({"backbone": backbone, "head": head})

    def ap50() -> float:
        model.eval()
        with torch.no_grad():
            meter = task.build_metric()
            meter.update(task.predict(head(backbone(images))), targets)
        model.train()
        return meter.compute()["ap50"]

    before = ap50()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    for _ in range(steps):
        loss = task.loss(head(backbone(images)), targets).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, ap50(), time.perf_counter() - start


@pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").exists(), reason="Fashion-MNIST not present")
def test_overfits_eight_scenes():
    torch.set_num_threads(1)
    before, after, seconds = _overfit(StandInBackbone(), steps=80)
    assert after > before + 30, (before, after)
    assert seconds < 30, seconds


def test_with_cnn_tiny_feature_backbone(task):
    from selftrain.backbones import build_feature_backbone

    backbone = build_feature_backbone("cnn-tiny", in_chans=1)
    head = task.build_head(backbone.channels, backbone.strides)
    out = head(backbone(torch.randn(2, 1, 64, 64)))
    assert out["cls_logits"].shape[:2] == out["bbox_regression"].shape[:2] == (2, len(out["points"]))
    loss = task.loss(out, _targets())
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert len(task.predict(out)) == 2
