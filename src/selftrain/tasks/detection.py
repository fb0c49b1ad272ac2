"""Object detection: an FPN + FCOS-style anchor-free head, per-image losses, COCO AP, scored pseudo boxes.

The head follows FCOS (Tian et al. 2019, "FCOS: Fully Convolutional One-Stage Object Detection"):
every feature-map location predicts class scores, its distances to the four box sides and a
"centerness". Pseudo labels follow Zoph et al. 2020 ("Rethinking Pre-training and Self-training"):
the teacher's boxes with score >= 0.5 become the student's targets, and here they keep their
scores, which the loss may use as per-box weights.

Built from torchvision pieces: :class:`torchvision.ops.FeaturePyramidNetwork` (+ ``LastLevelMaxPool``
for one coarser level), :class:`torchvision.models.detection.fcos.FCOSHead` (classification,
regression and centerness branches with FCOS' initialisation, and its ``BoxLinearCoder``),
``sigmoid_focal_loss``, ``generalized_box_iou_loss`` and ``batched_nms``. torchvision's ``FCOS``
model itself is not used: it wraps everything in ``GeneralizedRCNNTransform`` (its own
normalisation and resizing, which selftrain does itself), generates anchors from image lists, and
its ``compute_loss`` sums over the batch, whereas the student needs one loss per image to weigh
human against pseudo-labelled images. The location-to-box assignment below re-implements FCOS'
rules (centre sampling, per-level size ranges, smallest box wins) for that reason.

Outputs of the head (``B`` images, ``N`` locations over all levels, ``K`` classes)::

    cls_logits       (B, N, K)  class logits (sigmoid, one-vs-all)
    bbox_regression  (B, N, 4)  distances to the left, top, right, bottom sides / level stride, >= 0
    centerness       (B, N)     centerness logit
    points           (N, 2)     x, y of each location in input pixels (cell centres)
    strides          (N,)       stride of each location's level, in pixels
    image_size       (2,)       H, W of the input image (for clipping boxes)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops import (
    FeaturePyramidNetwork,
    batched_nms,
    clip_boxes_to_image,
    generalized_box_iou_loss,
    sigmoid_focal_loss,
)
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from selftrain.metrics import detection_ap
from selftrain.tasks import TASKS
from selftrain.tasks.dense import DenseTask

#: FCOS' size ranges: a level of stride s takes boxes whose largest side distance lies in (4 s, 8 s].
_RANGE_LOW, _RANGE_HIGH = 4.0, 8.0


class DetectionHead(nn.Module):
    """FPN over a backbone's feature maps, then FCOS' shared dense head on every pyramid level.

    Args:
        channels: Channels of the backbone maps, fine to coarse.
        strides: Their strides in input pixels, fine to coarse.
        num_classes: Object classes ``K``.
        fpn_channels: Width of the pyramid and the head; a multiple of 32 (FCOSHead uses GroupNorm(32)).
        num_convs: Conv layers per branch; FCOS uses 4, 2 keeps 64 px training fast on a CPU.
        min_stride: Maps finer than this are left out (at least the coarsest map is kept): at 64 px
            the objects span >= ~16 px, so a stride-1 level would cost most of the compute and add nothing.
        extra_level: Adds one coarser level by max-pooling the coarsest (torchvision's ``LastLevelMaxPool``),
            so large objects fall on a level whose cells see them whole.
    """

    def __init__(
        self,
        channels: Sequence[int],
        strides: Sequence[int],
        num_classes: int,
        *,
        fpn_channels: int = 32,
        num_convs: int = 2,
        min_stride: int = 2,
        extra_level: bool = True,
    ) -> None:
        super().__init__()
        if len(channels) != len(strides) or not channels:
            raise ValueError(f"need one stride per feature map, got channels={channels} strides={strides}")
        if fpn_channels % 32:
            raise ValueError(f"fpn_channels must be a multiple of 32 (GroupNorm(32)), got {fpn_channels}")
        keep = [i for i, s in enumerate(strides) if s >= min_stride] or [len(strides) - 1]
        self.used = keep
        self.input_stride = int(strides[0])
        self.level_strides = [int(strides[i]) for i in keep] + ([2 * int(strides[keep[-1]])] if extra_level else [])
        self.fpn = FeaturePyramidNetwork(
            [int(channels[i]) for i in keep], fpn_channels, extra_blocks=LastLevelMaxPool() if extra_level else None
        )
        self.head = FCOSHead(fpn_channels, num_anchors=1, num_classes=num_classes, num_convs=num_convs)

    def forward(self, features: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Backbone maps (fine to coarse) -> dense predictions (see the module docstring)."""
        pyramid = list(self.fpn(OrderedDict((str(j), features[i]) for j, i in enumerate(self.used))).values())
        out = self.head(pyramid)
        points, strides = [], []
        for level, stride in zip(pyramid, self.level_strides):
            h, w = level.shape[-2:]
            ys = (torch.arange(h, device=level.device, dtype=torch.float32) + 0.5) * stride
            xs = (torch.arange(w, device=level.device, dtype=torch.float32) + 0.5) * stride
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            points.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1))  # row-major, as FCOSHead
            strides.append(torch.full((h * w,), float(stride), device=level.device))
        finest = features[0].shape[-2:]
        return {
            "cls_logits": out["cls_logits"],
            "bbox_regression": out["bbox_regression"],
            "centerness": out["bbox_ctrness"].squeeze(-1),
            "points": torch.cat(points),
            "strides": torch.cat(strides),
            "image_size": torch.tensor([finest[0] * self.input_stride, finest[1] * self.input_stride]),
        }


def reference_boxes(points: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """One square of side ``stride`` per location (N, 4): the reference FCOS' box coder scales distances by."""
    half = strides[:, None] / 2
    return torch.cat([points - half, points + half], dim=1)


def assign_locations(
    points: torch.Tensor, strides: torch.Tensor, boxes: torch.Tensor, *, center_radius: float = 1.5
) -> torch.Tensor:
    """FCOS target assignment: which ground-truth box (if any) each location learns.

    A location is positive for a box when it lies inside the box, within ``center_radius * stride``
    of the box centre (FCOS' centre sampling) and its level's size range holds the box's largest
    side distance from it (``(4 s, 8 s]``, open-ended for the finest and coarsest levels). A location
    matching several boxes learns the smallest one, as in FCOS.

    Args:
        points: Location centres (N, 2) in pixels.
        strides: Level stride of each location (N,).
        boxes: Ground-truth boxes (M, 4), XYXY pixels.

    Returns:
        Index into ``boxes`` per location (N,) int64; -1 = background.
    """
    n = len(points)
    if len(boxes) == 0:
        return torch.full((n,), -1, dtype=torch.long, device=points.device)
    boxes = boxes.to(points)
    x, y = points[:, 0:1], points[:, 1:2]  # (N, 1)
    ltrb = torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], dim=2)  # (N, M, 4)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2  # (M, 2)
    near_centre = (points[:, None, :] - centres[None]).abs().amax(dim=2) < center_radius * strides[:, None]
    low = torch.where(strides == strides.min(), 0.0, _RANGE_LOW * strides)
    high = torch.where(strides == strides.max(), float("inf"), _RANGE_HIGH * strides)
    reach = ltrb.amax(dim=2)
    match = (ltrb.amin(dim=2) > 0) & near_centre & (reach > low[:, None]) & (reach <= high[:, None])
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    cost = torch.where(match, area[None].expand(n, -1), torch.full_like(reach, float("inf")))
    best_cost, best = cost.min(dim=1)
    return torch.where(torch.isfinite(best_cost), best, torch.full_like(best, -1))


@TASKS.register("detection")
class Detection(DenseTask):
    """Boxes of ``num_classes`` object classes, XYXY pixels (see :mod:`selftrain.data.targets`).

    Example:
        >>> task = Detection(num_classes=11)
        >>> head = task.build_head(backbone.channels, backbone.strides)  # doctest: +SKIP
        >>> outputs = head(backbone(images))  # doctest: +SKIP
        >>> task.loss(outputs, targets).mean().backward()  # doctest: +SKIP
        >>> task.predict(outputs)  # doctest: +SKIP
        [{'boxes': ..., 'scores': ..., 'labels': ...}, ...]
    """

    name = "detection"
    metric = "ap"  # the headline metric; the accumulator comes from build_metric()
    higher_is_better = True
    target_keys = ("boxes", "labels")

    def __init__(
        self,
        num_classes: int,
        *,
        fpn_channels: int = 32,
        num_convs: int = 2,
        min_stride: int = 2,
        extra_level: bool = True,
        center_radius: float = 1.5,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"detection needs at least 1 class, got {num_classes}")
        self.num_classes = num_classes
        self.head_options = {"fpn_channels": fpn_channels, "num_convs": num_convs, "min_stride": min_stride,
                             "extra_level": extra_level}  # fmt: skip
        self.center_radius = center_radius
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        # The coder FCOSHead uses (torchvision keeps it in a private module, stable since 0.12):
        # side distances normalised by the reference box size, which is the level stride here.
        self.box_coder = BoxLinearCoder(normalize_by_size=True)

    def build_head(self, channels: Sequence[int], strides: Sequence[int]) -> DetectionHead:
        """The FPN + FCOS head for a backbone with these feature ``channels`` and ``strides`` (fine to coarse)."""
        return DetectionHead(channels, strides, self.num_classes, **self.head_options)

    def loss(self, outputs: dict[str, torch.Tensor], targets: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Per-image FCOS loss (B,): focal classification + GIoU box + centerness BCE.

        Each term is summed over locations and divided by the image's number of positive
        locations (at least 1), so every image's loss is on the same scale and the student can
        average human and pseudo-labelled images separately. An image without boxes contributes
        only the classification loss of its (all negative) locations.

        Pseudo targets may carry ``scores`` (n,): each box then weighs its positive locations' three
        terms by its score, so a box the teacher was unsure of pulls less; negatives keep weight 1,
        and the normaliser stays the unweighted count of positives.
        """
        points, strides = outputs["points"], outputs["strides"]
        refs = reference_boxes(points, strides)
        losses = []
        for i, target in enumerate(targets):
            logits = outputs["cls_logits"][i].float()  # (N, K)
            boxes = target["boxes"].to(points)
            matched = assign_locations(points, strides, boxes, center_radius=self.center_radius)
            pos = matched >= 0
            num_pos = pos.sum().clamp(min=1).float()
            gt_idx = matched[pos]
            weight = torch.ones_like(strides)
            if "scores" in target and len(gt_idx):
                weight[pos] = target["scores"].to(points)[gt_idx]
            cls_target = torch.zeros_like(logits)
            cls_target[pos, target["labels"].to(points.device)[gt_idx]] = 1.0
            focal = sigmoid_focal_loss(logits, cls_target, self.focal_alpha, self.focal_gamma, reduction="none")
            total = (focal.sum(dim=1) * weight).sum()
            if len(gt_idx):
                gt, w = boxes[gt_idx], weight[pos]
                pred = self.box_coder.decode(outputs["bbox_regression"][i][pos].float(), refs[pos])
                total = total + (generalized_box_iou_loss(pred, gt, reduction="none") * w).sum()
                ltrb = self.box_coder.encode(refs[pos], gt)
                lr, tb = ltrb[:, [0, 2]], ltrb[:, [1, 3]]
                ctr_target = torch.sqrt((lr.amin(1) / lr.amax(1)) * (tb.amin(1) / tb.amax(1)))
                ctr_logits = outputs["centerness"][i][pos].float()
                ctr = F.binary_cross_entropy_with_logits(ctr_logits, ctr_target, reduction="none")
                total = total + (ctr * w).sum()
            losses.append(total / num_pos)
        return torch.stack(losses)

    @torch.no_grad()
    def predict(
        self,
        outputs: dict[str, torch.Tensor],
        score_threshold: float = 0.05,
        nms_iou: float = 0.6,
        max_det: int = 100,
        max_candidates: int = 1000,
    ) -> list[dict[str, torch.Tensor]]:
        """Dense outputs -> boxes per image, after class-wise NMS.

        The score of a (location, class) is ``sqrt(sigmoid(class) * sigmoid(centerness))`` as in
        torchvision's FCOS, so off-centre locations, whose boxes are worse, rank lower in NMS.
        At most ``max_candidates`` pairs per image above ``score_threshold`` enter NMS.

        Returns:
            One dict per image: ``boxes`` float32 (n, 4) XYXY pixels clipped to the image, ``scores``
            float32 (n,) in decreasing order, ``labels`` int64 (n,).
        """
        refs = reference_boxes(outputs["points"], outputs["strides"])
        height, width = (int(v) for v in outputs["image_size"])
        results = []
        for logits, reg, ctr in zip(outputs["cls_logits"], outputs["bbox_regression"], outputs["centerness"]):
            scores = torch.sqrt(torch.sigmoid(logits.float()) * torch.sigmoid(ctr.float())[:, None]).flatten()
            keep = torch.nonzero(scores >= score_threshold).squeeze(1)
            if len(keep) > max_candidates:
                keep = keep[scores[keep].topk(max_candidates).indices]
            loc, labels = keep // self.num_classes, keep % self.num_classes
            boxes = clip_boxes_to_image(self.box_coder.decode(reg[loc].float(), refs[loc]), (height, width))
            kept = batched_nms(boxes, scores[keep], labels, nms_iou)[:max_det]
            results.append({"boxes": boxes[kept].float(), "scores": scores[keep][kept].float(), "labels": labels[kept]})
        return results

    def encode_pseudo(
        self, outputs: dict[str, torch.Tensor], threshold: float = 0.5, nms_iou: float = 0.6, max_det: int = 100
    ) -> list[dict[str, torch.Tensor]]:
        """Teacher outputs -> pseudo boxes per image (on the CPU, ready to store).

        Keeps the boxes scoring at least ``threshold`` (0.5 in Zoph et al. 2020) together with their
        ``scores``, so the student may weigh them (see :meth:`loss`) and a later filter may re-threshold.
        An image may end up with no box; it then teaches "background everywhere".
        """
        preds = self.predict(outputs, score_threshold=threshold, nms_iou=nms_iou, max_det=max_det)
        return [{"boxes": p["boxes"].cpu(), "labels": p["labels"].cpu(), "scores": p["scores"].cpu()} for p in preds]

    def build_metric(self) -> DetectionAP:
        """A fresh COCO AP accumulator for one evaluation pass."""
        return DetectionAP()

    # ------------------------------------------------------------------ pseudo-label store

    def pseudo_options(self, label_cfg) -> dict:
        return {"threshold": label_cfg.box_threshold}

    def pseudo_schema(self) -> dict[str, pa.DataType]:
        return {"detection.boxes": pa.list_(pa.float32()), "detection.labels": pa.list_(pa.int32()),
                "detection.scores": pa.list_(pa.float32()), "detection.confidence": pa.float32()}  # fmt: skip

    def record_columns(self, targets: Sequence[dict[str, torch.Tensor]]) -> dict[str, list]:
        return {
            "detection.boxes": [t["boxes"].reshape(-1).tolist() for t in targets],
            "detection.labels": [t["labels"].tolist() for t in targets],
            # Ground-truth boxes carry no score: they weigh 1 in the loss.
            "detection.scores": [t["scores"].tolist() if "scores" in t else [1.0] * len(t["labels"]) for t in targets],
        }

    def record_confidence(self, outputs, targets: Sequence[dict[str, torch.Tensor]]) -> np.ndarray:
        """The mean score of an image's pseudo boxes; 0 for an image left without a box."""
        return np.array([float(t["scores"].mean()) if len(t["scores"]) else 0.0 for t in targets], dtype=np.float32)

    def decode_rows(self, table: pa.Table) -> list[dict[str, torch.Tensor]]:
        boxes, labels, scores = (table.column(f"detection.{c}").to_pylist() for c in ("boxes", "labels", "scores"))
        return [
            {"boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(lab, dtype=torch.int64),
             "scores": torch.tensor(sc, dtype=torch.float32)}
            for b, lab, sc in zip(boxes, labels, scores)
        ]  # fmt: skip


class DetectionAP:
    """Collects predictions and targets image by image; COCO AP needs the whole set at once.

    Example:
        >>> meter = Detection(11).build_metric()
        >>> for images, targets in loader:  # doctest: +SKIP
        ...     meter.update(task.predict(head(backbone(images))), targets)
        >>> meter.compute()  # doctest: +SKIP
        {'ap': ..., 'ap50': ...}
    """

    def __init__(self) -> None:
        self.preds: list[dict[str, torch.Tensor]] = []
        self.targets: list[dict[str, torch.Tensor]] = []

    def update(self, preds: Sequence[dict[str, torch.Tensor]], targets: Sequence[dict[str, torch.Tensor]]) -> None:
        """Adds one batch; tensors are copied to the CPU so a long evaluation does not hold device memory."""
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predictions but {len(targets)} targets")
        self.preds += [{k: p[k].detach().cpu() for k in ("boxes", "scores", "labels")} for p in preds]
        self.targets += [{k: t[k].detach().cpu() for k in ("boxes", "labels")} for t in targets]

    def compute(self) -> dict[str, float]:
        """``{"ap", "ap50"}`` in percent over everything added (see :func:`selftrain.metrics.detection_ap`)."""
        return detection_ap(self.preds, self.targets)

    def reset(self) -> None:
        self.preds, self.targets = [], []
