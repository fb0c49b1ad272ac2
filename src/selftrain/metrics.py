"""Evaluation metrics of the dense tasks: COCO AP, mIoU, depth errors and landmark NME.

Every metric here is exact over a whole evaluation set. The accumulating ones are
:class:`torchmetrics.Metric` subclasses whose states are sums and counts (``dist_reduce_fx="sum"``),
so a dataset-level value is computed from totals, never as a mean of per-batch values, and the
same object syncs across DDP processes. Each has a one-shot function for full tensors.

==============  ============================================  =========================================
task            function / accumulator                        values
==============  ============================================  =========================================
detection       :func:`detection_ap`                          ``ap`` (AP@[.5:.95]), ``ap50``, in %
segmentation    :func:`segmentation_miou`,                    ``miou``, ``pixel_acc``, in %
                :class:`SegmentationIoU`
depth           :func:`depth_metrics`, :class:`DepthErrors`   ``absrel`` (ratio), ``rmse`` (depth
                                                              units), ``delta1`` (%)
keypoints       :func:`keypoint_nme`, :class:`KeypointNME`    ``nme``, in % of the per-image norm
==============  ============================================  =========================================

Inputs follow :mod:`selftrain.data.targets`: boxes XYXY pixels, masks int64 with
:data:`~selftrain.data.targets.IGNORE_INDEX`, depth with ``0`` = no value, keypoints ``(P, 3)``
as ``x, y, v``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.functional.classification import multiclass_confusion_matrix

from selftrain.data.targets import IGNORE_INDEX


def detection_ap(
    preds: Sequence[dict[str, torch.Tensor]], targets: Sequence[dict[str, torch.Tensor]]
) -> dict[str, float]:
    """COCO box AP of a whole evaluation set, through torchmetrics' ``MeanAveragePrecision``.

    The official COCO evaluation (pycocotools backend): greedy matching by score, 101-point
    interpolated precision, averaged over classes and over IoU thresholds 0.50:0.05:0.95 (``ap``)
    or at IoU 0.5 only (``ap50``), at most 100 detections per image. COCO evaluation needs every
    detection of the set at once, so this takes full lists rather than accumulating batches.

    Args:
        preds: One dict per image with ``boxes`` (float (n, 4) XYXY pixels), ``scores`` (n,), ``labels`` (n,).
        targets: One dict per image with ``boxes`` and ``labels``.

    Returns:
        ``{"ap": ..., "ap50": ...}`` in percent.

    Raises:
        ValueError: The lists differ in length, or no image has a ground-truth box (AP is undefined;
            torchmetrics would report -1).
    """
    from torchmetrics.detection import MeanAveragePrecision

    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions but {len(targets)} targets")
    if sum(len(t["boxes"]) for t in targets) == 0:
        raise ValueError("no ground-truth boxes: AP is undefined")
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    metric.update(
        [{"boxes": p["boxes"].float(), "scores": p["scores"].float(), "labels": p["labels"].long()} for p in preds],
        [{"boxes": t["boxes"].float(), "labels": t["labels"].long()} for t in targets],
    )
    result = metric.compute()
    return {"ap": 100 * float(result["map"]), "ap50": 100 * float(result["map_50"])}


class SegmentationIoU(Metric):
    """Confusion-matrix accumulator for mIoU and pixel accuracy over a whole evaluation set.

    Only the (K, K) confusion matrix is kept, so any number of maps can be scored. Convention:
    ``IoU_k = TP / (TP + FP + FN)``; a class with ``TP + FP + FN = 0`` (absent from both the
    predictions and the labels over everything seen) is left out of the mean, since it has no
    IoU; a class predicted but never labelled scores 0 and counts. Pixels whose label is
    ``ignore_index`` count nowhere, whatever was predicted there.

    Example:
        >>> meter = SegmentationIoU(num_classes=3)
        >>> for logits, mask in loader:  # doctest: +SKIP
        ...     meter.update(logits, mask)
        >>> meter.compute()  # doctest: +SKIP
        {'miou': ..., 'pixel_acc': ...}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state("confmat", torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Adds one batch.

        Args:
            pred: Class indices (B, H, W) in ``[0, K)``, or logits (B, K, H, W) (argmax taken).
            target: Labels (B, H, W), each in ``[0, K)`` or ``ignore_index``.
        """
        if pred.is_floating_point():
            if pred.ndim != target.ndim + 1 or pred.shape[1] != self.num_classes:
                raise ValueError(f"logits {tuple(pred.shape)} do not fit labels {tuple(target.shape)}")
            pred = pred.argmax(dim=1)
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(target.shape)} differ in shape")
        # torchmetrics' own argument checks look at every unique value; these two reductions are cheaper.
        if pred.numel() and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"predicted classes must lie in [0, {self.num_classes})")
        if ((target >= self.num_classes) & (target != self.ignore_index) | (target < 0)).any():
            raise ValueError(f"labels must lie in [0, {self.num_classes}) or be {self.ignore_index}")
        self.confmat += multiclass_confusion_matrix(
            pred, target, self.num_classes, ignore_index=self.ignore_index, validate_args=False
        )  # rows = label, columns = prediction

    def compute(self) -> dict[str, float]:
        """``{"miou": ..., "pixel_acc": ...}`` in percent; raises ValueError when no pixel was labelled."""
        confmat = self.confmat.double()
        total = confmat.sum()
        if total == 0:
            raise ValueError("no labelled pixels: mIoU is undefined")
        tp = confmat.diagonal()
        union = confmat.sum(0) + confmat.sum(1) - tp
        present = union > 0
        return {
            "miou": 100 * float((tp[present] / union[present]).mean()),
            "pixel_acc": 100 * float(tp.sum() / total),
        }


def segmentation_miou(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> dict[str, float]:
    """mIoU and pixel accuracy (percent) of full tensors; see :class:`SegmentationIoU` for the convention."""
    meter = SegmentationIoU(num_classes, ignore_index).to(target.device)
    meter.update(pred, target)
    return meter.compute()


class DepthErrors(Metric):
    """AbsRel, RMSE and delta1 over every valid pixel of an evaluation set (Eigen et al. 2014).

    A pixel is valid where the target is ``> 0`` (``0`` = no value). Over the valid pixels of
    everything seen: ``absrel = mean(|p - t| / t)``, ``rmse = sqrt(mean((p - t)^2))`` (in the
    depth's own units) and ``delta1 = 100 * mean(max(p / t, t / p) < 1.25)``. The states are
    float64 sums and a pixel count, so the result is the dataset value exactly, not a mean of
    batch means. A non-positive prediction counts as a delta1 failure.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("abs_rel", "sq_err", "within", "count"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Adds one batch of maps of equal shape, e.g. (B, H, W)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        valid = target > 0
        p, t = pred[valid].double(), target[valid].double()
        ratio = torch.maximum(p / t, t / p)  # p = 0 gives inf; p < 0 a negative ratio, failed below
        self.abs_rel += ((p - t).abs() / t).sum()
        self.sq_err += ((p - t) ** 2).sum()
        self.within += ((p > 0) & (ratio < 1.25)).sum()
        self.count += p.numel()

    def compute(self) -> dict[str, float]:
        """``{"absrel", "rmse", "delta1"}``; raises ValueError when no pixel was valid."""
        if self.count == 0:
            raise ValueError("no valid depth pixels (target > 0): depth metrics are undefined")
        return {
            "absrel": float(self.abs_rel / self.count),
            "rmse": float((self.sq_err / self.count).sqrt()),
            "delta1": 100 * float(self.within / self.count),
        }


def depth_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """AbsRel, RMSE and delta1 (percent) of full tensors; see :class:`DepthErrors`."""
    meter = DepthErrors().to(target.device)
    meter.update(pred, target)
    return meter.compute()


def bbox_diagonal_norm(target: torch.Tensor) -> torch.Tensor:
    """Per-image NME normaliser: the diagonal of the bounding box of the visible target points.

    Used when a dataset gives no task-specific norm (such as the inter-ocular distance of face
    landmarks): it scales with the object's size, so the NME of a small and a large object
    weigh alike. An image with fewer than two distinct visible points gets 0, which
    :class:`KeypointNME` refuses.

    Args:
        target: Keypoints (N, P, 3) or (P, 3) as ``x, y, v``; points with ``v > 0`` are visible.

    Returns:
        The diagonal in pixels, (N,) or a scalar for one image.
    """
    visible = (target[..., 2] > 0).unsqueeze(-1)  # (N, P, 1)
    xy = target[..., :2]
    high = torch.where(visible, xy, torch.full_like(xy, -torch.inf)).amax(dim=-2)
    low = torch.where(visible, xy, torch.full_like(xy, torch.inf)).amin(dim=-2)
    diagonal = (high - low).norm(dim=-1)
    return torch.where(visible.any(dim=(-2, -1)), diagonal, torch.zeros_like(diagonal))


class KeypointNME(Metric):
    """Normalised mean error of keypoints, in percent, over an evaluation set.

    Per image, ``NME_i = mean over visible target points (v > 0) of ||p - t|| / norm_i``; the
    result is ``100 * mean_i NME_i`` over the images with at least one visible point (the usual
    face-alignment convention, e.g. 300W/WFLW with the inter-ocular norm). Images without a
    visible point have nothing to score and are skipped. The state is the sum of per-image
    NMEs and their count, so accumulating batches gives the one-shot value.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nme_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("images", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor, norm: torch.Tensor | float | None = None) -> None:
        """Adds one batch.

        Args:
            pred: Predicted points (N, P, 2) or (N, P, 3) (a third column is ignored), or one image (P, 2|3).
            target: Target points (N, P, 3) as ``x, y, v``, or (P, 3).
            norm: Per-image normaliser (N,) or a scalar; default :func:`bbox_diagonal_norm` of ``target``.

        Raises:
            ValueError: Shapes do not fit, or an image with visible points has a norm <= 0.
        """
        if target.ndim == 2:
            pred, target = pred.unsqueeze(0), target.unsqueeze(0)
        if pred.shape[:2] != target.shape[:2] or target.shape[-1] != 3 or pred.shape[-1] not in (2, 3):
            raise ValueError(f"prediction {tuple(pred.shape)} does not fit target {tuple(target.shape)} (N, P, 3)")
        if norm is None:
            norm = bbox_diagonal_norm(target)
        norm = torch.as_tensor(norm, dtype=torch.float64, device=target.device).expand(target.shape[0])
        visible = target[..., 2] > 0  # (N, P)
        scored = visible.any(dim=1)
        if (norm[scored] <= 0).any():
            bad = torch.nonzero(scored & (norm <= 0)).flatten()[:5].tolist()
            raise ValueError(f"images {bad} have visible points but a norm <= 0 (a single visible point has no extent)")
        error = (pred[..., :2].double() - target[..., :2].double()).norm(dim=-1)  # (N, P)
        per_image = (error * visible).sum(dim=1) / visible.sum(dim=1).clamp_min(1)
        self.nme_sum += (per_image[scored] / norm[scored]).sum()
        self.images += scored.sum()

    def compute(self) -> dict[str, float]:
        """``{"nme": ...}`` in percent; raises ValueError when no image had a visible point."""
        if self.images == 0:
            raise ValueError("no image with a visible keypoint: NME is undefined")
        return {"nme": 100 * float(self.nme_sum / self.images)}


def keypoint_nme(
    pred: torch.Tensor, target: torch.Tensor, norm: torch.Tensor | float | None = None
) -> dict[str, float]:
    """NME (percent) of full tensors; see :class:`KeypointNME` (``norm`` defaults to :func:`bbox_diagonal_norm`)."""
    meter = KeypointNME().to(target.device)
    meter.update(pred, target, norm)
    return meter.compute()
