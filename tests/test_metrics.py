"""Dense-task metrics against values computed by hand on tiny cases."""

import math

import pytest
import torch

from selftrain.data.targets import IGNORE_INDEX
from selftrain.metrics import (
    DepthErrors,
    KeypointNME,
    SegmentationIoU,
    bbox_diagonal_norm,
    depth_metrics,
    detection_ap,
    keypoint_nme,
    segmentation_miou,
)


def _det(boxes, scores=None, labels=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    out = {"boxes": boxes, "labels": torch.tensor(labels or [0] * len(boxes), dtype=torch.int64)}
    if scores is not None:
        out["scores"] = torch.tensor(scores, dtype=torch.float32)
    return out


GT = _det([[0, 0, 10, 10], [20, 20, 30, 30]])


def test_detection_perfect_is_100():
    preds = [_det([[20, 20, 30, 30], [0, 0, 10, 10]], [0.6, 0.9])]
    assert detection_ap(preds, [GT]) == pytest.approx({"ap": 100.0, "ap50": 100.0})


def test_detection_duplicate_is_a_false_positive():
    # Ranked by score: A (0.9, hits GT1) TP, B (0.8, same box again) FP, C (0.7, hits GT2) TP.
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1; made non-increasing from the right: 1, 2/3, 2/3.
    # COCO samples 101 recall levels 0, .01, ..., 1: the 51 levels <= .5 read 1, the 50 levels > .5 read 2/3.
    # AP = (51 * 1 + 50 * 2/3) / 101 = 84.333 / 101 = 83.498 %, at every IoU threshold (the boxes are exact).
    preds = [_det([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8, 0.7])]
    expected = 100 * (51 + 50 * 2 / 3) / 101
    assert detection_ap(preds, [GT]) == pytest.approx({"ap": expected, "ap50": expected}, abs=1e-3)


def test_detection_loose_box_counts_only_at_low_iou_thresholds():
    # C now covers 10 x 7.2 of GT2 (10 x 10): IoU 0.72, a TP at thresholds .50-.70 (5 of 10) -> 83.498 % as above.
    # At .75-.95 C is a FP too: precision 1, 1/2, 1/3 at recall 1/2 throughout; levels <= .5 read 1, levels > .5
    # are never reached and read 0: AP = 51 / 101 = 50.495 %. AP@[.5:.95] = (5 * 83.498 + 5 * 50.495) / 10 = 66.997 %.
    preds = [_det([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 27.2]], [0.9, 0.8, 0.7])]
    at_low = 100 * (51 + 50 * 2 / 3) / 101
    at_high = 100 * 51 / 101
    result = detection_ap(preds, [GT])
    assert result["ap50"] == pytest.approx(at_low, abs=1e-3)
    assert result["ap"] == pytest.approx((at_low + at_high) / 2, abs=1e-3)


def test_detection_refuses_a_set_without_boxes():
    with pytest.raises(ValueError, match="no ground-truth boxes"):
        detection_ap([_det([[0, 0, 1, 1]], [0.5])], [_det([])])


# Labels (one ignored pixel, where the prediction says class 2) and predictions, K = 3.
SEG_TARGET = torch.tensor([[[0, 0, 1], [1, 1, IGNORE_INDEX]]])
SEG_PRED = torch.tensor([[[0, 1, 1], [1, 1, 2]]])


def test_miou_by_hand_ignored_pixel_does_not_count():
    # Scored pixels (label, pred): (0,0) (0,1) (1,1) (1,1) (1,1).
    # class 0: TP 1, FP 0, FN 1 -> 1/2; class 1: TP 3, FP 1, FN 0 -> 3/4; class 2: only at the ignored
    # pixel, so absent from both -> left out. mIoU = (1/2 + 3/4) / 2 = 62.5 %; pixel acc = 4/5 = 80 %.
    # (Had the ignored pixel counted, class 2 would score IoU 0 and mIoU would be 41.7 %.)
    result = segmentation_miou(SEG_PRED, SEG_TARGET, num_classes=3)
    assert result == pytest.approx({"miou": 62.5, "pixel_acc": 80.0})


def test_miou_class_predicted_but_never_labelled_scores_zero():
    pred = SEG_PRED.clone()
    pred[0, 0, 0] = 2  # class 2 predicted where 0 is labelled: class 0 IoU 0/2, class 1 3/4, class 2 0/1
    assert segmentation_miou(pred, SEG_TARGET, 3)["miou"] == pytest.approx(100 * 0.75 / 3)


def test_miou_takes_logits():
    logits = torch.nn.functional.one_hot(SEG_PRED, 3).permute(0, 3, 1, 2).float()  # (B, K, H, W)
    assert segmentation_miou(logits, SEG_TARGET, 3) == pytest.approx({"miou": 62.5, "pixel_acc": 80.0})


def test_miou_accumulates_exactly():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (6, 16, 16), generator=g)
    target[target == 3] = IGNORE_INDEX
    pred = torch.randint(0, 3, (6, 16, 16), generator=g)
    pred[:3][pred[:3] == 2] = 0  # class 2 never predicted in the first half: per-batch mIoUs would differ
    meter = SegmentationIoU(3)
    meter.update(pred[:3], target[:3])
    meter.update(pred[3:], target[3:])
    one_shot = segmentation_miou(pred, target, 3)
    assert meter.compute() == pytest.approx(one_shot, abs=1e-9)


def test_miou_refuses_out_of_range_values():
    with pytest.raises(ValueError, match="predicted classes"):
        segmentation_miou(torch.tensor([[3]]), torch.tensor([[0]]), 3)
    with pytest.raises(ValueError, match="labels must lie"):
        segmentation_miou(torch.tensor([[0]]), torch.tensor([[7]]), 3)


def test_depth_by_hand_invalid_pixel_does_not_count():
    target = torch.tensor([[2.0, 4.0], [0.0, 1.0]])  # 0 = no value
    pred = torch.tensor([[2.4, 4.0], [7.0, 2.0]])
    # valid (p, t): (2.4, 2) (4, 4) (2, 1)
    # AbsRel = (0.4/2 + 0/4 + 1/1) / 3 = 1.2 / 3 = 0.4; RMSE = sqrt((0.16 + 0 + 1) / 3) = sqrt(0.38667) = 0.62183
    # ratios max(p/t, t/p) = 1.2, 1, 2 -> 2 of 3 below 1.25 -> delta1 = 66.667 %
    result = depth_metrics(pred, target)
    assert result == pytest.approx({"absrel": 0.4, "rmse": math.sqrt(1.16 / 3), "delta1": 200 / 3})


def test_depth_nonpositive_prediction_fails_delta1():
    result = depth_metrics(torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert result["delta1"] == 0.0


def test_depth_accumulates_exactly():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(5, 8, 8, generator=g) * 10
    target[target < 2] = 0
    target[3] = 0  # a batch member without any valid pixel changes the weights of a mean of batch means
    pred = target + torch.randn(5, 8, 8, generator=g)
    meter = DepthErrors()
    meter.update(pred[:2], target[:2])
    meter.update(pred[2:], target[2:])
    assert meter.compute() == pytest.approx(depth_metrics(pred, target), rel=1e-12)


def test_depth_refuses_no_valid_pixel():
    with pytest.raises(ValueError, match="no valid depth pixels"):
        depth_metrics(torch.ones(2, 2), torch.zeros(2, 2))


def test_nme_by_hand_invisible_point_does_not_count():
    target = torch.tensor([[0.0, 0.0, 1.0], [10.0, 0.0, 0.0]])  # the second point is invisible
    pred = torch.tensor([[3.0, 4.0], [100.0, 100.0]])
    # one visible point, error ||(3, 4)|| = 5, norm 10 -> NME = 5 / 10 = 50 %
    assert keypoint_nme(pred, target, norm=10.0) == pytest.approx({"nme": 50.0})


def test_nme_is_a_mean_of_per_image_values():
    target = torch.tensor([[[0.0, 0.0, 1.0], [4.0, 0.0, 1.0]], [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]])
    pred = torch.tensor([[[1.0, 0.0, 0.9], [4.0, 3.0, 0.9]], [[0.0, 2.0, 0.9], [9.0, 9.0, 0.9]]])
    # image 0: errors 1 and 3, mean 2, norm 4 -> 0.5; image 1: error 2 (one visible point), norm 8 -> 0.25
    # NME = (0.5 + 0.25) / 2 = 37.5 %
    assert keypoint_nme(pred, target, norm=torch.tensor([4.0, 8.0])) == pytest.approx({"nme": 37.5})


def test_bbox_diagonal_norm_uses_visible_points_only():
    target = torch.tensor([[[1.0, 1.0, 1.0], [4.0, 5.0, 0.5], [100.0, 100.0, 0.0]], [[0, 0, 0], [0, 0, 0], [0, 0, 0]]])
    # visible points (1, 1) and (4, 5): box 3 x 4, diagonal 5; no visible point: 0
    assert bbox_diagonal_norm(target).tolist() == [5.0, 0.0]
    pred = target[..., :2] + torch.tensor([0.0, 1.0])  # every point 1 px off
    # image 0: error 1 / diagonal 5 = 20 %; image 1 has nothing visible and is skipped
    assert keypoint_nme(pred, target) == pytest.approx({"nme": 20.0})


def test_nme_refuses_zero_norm_with_visible_points():
    target = torch.tensor([[[2.0, 2.0, 1.0], [0.0, 0.0, 0.0]]])  # a single visible point has no extent
    with pytest.raises(ValueError, match="norm <= 0"):
        keypoint_nme(target[..., :2], target)


def test_nme_accumulates_exactly():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(7, 5, 3, generator=g) * 50
    target[..., 2] = (torch.rand(7, 5, generator=g) > 0.3).float()
    target[:, :2, 2] = 1  # at least two visible points per image, so the diagonal norm is positive
    pred = target[..., :2] + torch.randn(7, 5, 2, generator=g)
    meter = KeypointNME()
    meter.update(pred[:3], target[:3])
    meter.update(pred[3:], target[3:])
    assert meter.compute() == pytest.approx(keypoint_nme(pred, target), rel=1e-12)
