"""Keypoints / landmarks: Gaussian heatmap regression, NME, pseudo points with per-point confidence.

Heatmaps as in Xiao et al. 2018 ("Simple Baselines for Human Pose Estimation and Tracking"): the
head predicts one map per point at the input resolution (stride 1), trained with mean squared
error against a Gaussian (peak 1, ``sigma`` pixels) centred on the point. A map is decoded by its
argmax, refined to sub-pixel precision by a parabola fit to its log values, and its peak value is
the point's confidence. Pseudo labels (MuST, Ghiasi et al. 2021: "coordinates + per-point
confidence") are the teacher's decoded points with ``v`` = confidence, and ``v = 0`` (missing) for
points under a threshold (``label.point_threshold``); the loss leaves missing points out, and a
record's confidence is the mean peak value of its points.

The task is sized by its labeled source (``num_points``, and ``keypoint_flip_pairs`` when its points
have sides, e.g. the left-most / right-most points of ``scenes:`` sources): a mirrored image
swaps each pair, so a "left" point stays the left one.

Coordinates follow :mod:`selftrain.data.targets`: ``x, y`` in pixels of the image, where pixel
column ``j`` spans ``[j, j + 1)``, so its centre is ``x = j + 0.5``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from selftrain.metrics import KeypointNME, bbox_diagonal_norm
from selftrain.tasks import TASKS
from selftrain.tasks.decoder import DenseHead
from selftrain.tasks.dense import DenseTask, stack_key


class KeypointMeter(KeypointNME):
    """:class:`KeypointNME` that also takes the tasks' lists of ``{"keypoints": (P, 3)}`` dicts.

    The norm is :func:`selftrain.metrics.bbox_diagonal_norm` of the targets unless given.
    """

    def update(
        self,
        preds: torch.Tensor | Sequence[dict],
        targets: torch.Tensor | Sequence[dict],
        norm: torch.Tensor | float | None = None,
    ) -> None:
        super().update(stack_key(preds, "keypoints"), stack_key(targets, "keypoints"), norm)


class PseudoPointQuality(KeypointMeter):
    """NME of pseudo points against the true ones over the points the pseudo labels keep (``v > 0``),
    ``nme_all`` over every point (the teacher's guesses under the threshold included), and
    ``coverage``: the percentage of true visible points the pseudo labels keep.

    Every image is normalised by its *true* points' :func:`bbox_diagonal_norm`, whichever points are kept.
    """

    def __init__(self) -> None:
        super().__init__()
        self.every_point = KeypointMeter()
        self.kept, self.visible = 0, 0

    def update(self, preds: Sequence[dict], targets: Sequence[dict]) -> None:
        pred, truth = stack_key(preds, "keypoints"), stack_key(targets, "keypoints")
        norm = bbox_diagonal_norm(truth)
        self.every_point.update(pred, truth, norm)
        kept = truth.clone()
        kept[..., 2] = kept[..., 2] * (pred[..., 2] > 0)
        self.kept += int((kept[..., 2] > 0).sum())
        self.visible += int((truth[..., 2] > 0).sum())
        super().update(pred, kept, norm)

    def compute(self) -> dict[str, float]:
        coverage = 100 * self.kept / max(self.visible, 1)
        every = {"nme_all": self.every_point.compute()["nme"]} if self.visible else {}
        if self.kept == 0:
            return {**every, "coverage": coverage}
        return {**super().compute(), **every, "coverage": coverage}


def gaussian_heatmaps(keypoints: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """Target heatmaps: points (B, P, 3) as ``x, y, v`` -> (B, P, H, W), peak 1 at each point.

    Missing points (``v = 0``) get an all-zero map (they are excluded from the loss anyway).
    """
    xs = torch.arange(width, device=keypoints.device, dtype=torch.float32) + 0.5  # pixel centres
    ys = torch.arange(height, device=keypoints.device, dtype=torch.float32) + 0.5
    dx = (xs - keypoints[..., 0:1]) ** 2  # (B, P, W)
    dy = (ys - keypoints[..., 1:2]) ** 2  # (B, P, H)
    maps = torch.exp(-(dy.unsqueeze(-1) + dx.unsqueeze(-2)) / (2 * sigma**2))  # (B, P, H, W)
    return maps * (keypoints[..., 2] > 0)[..., None, None]


def decode_heatmaps(heatmaps: torch.Tensor) -> torch.Tensor:
    """Heatmaps (B, P, H, W) -> points (B, P, 3): ``x, y`` (pixels) and the peak value in ``[0, 1]``.

    Argmax, then along each axis the vertex of the parabola through the log values at the peak and
    its two neighbours (as in DARK, Zhang et al. 2020): the log of a Gaussian is a parabola, so a
    Gaussian peak is located exactly wherever it lies between pixels, and not just to the nearest
    pixel. Offsets are clamped to half a pixel, and dropped where the fit is not a maximum (flat or
    non-positive neighbourhoods, e.g. an untrained map).
    """
    w = heatmaps.shape[-1]
    peak, index = heatmaps.float().flatten(2).max(dim=2)  # (B, P)
    row, col = index // w, index % w
    padded = F.pad(heatmaps.float(), (1, 1, 1, 1))  # (B, P, H+2, W+2); outside the map counts as 0

    def at(dr: int, dc: int) -> torch.Tensor:
        flat = (row + 1 + dr) * (w + 2) + (col + 1 + dc)
        return padded.flatten(2).gather(2, flat.unsqueeze(-1)).squeeze(-1).clamp_min(1e-10).log()

    centre = at(0, 0)

    def offset(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        curvature = before - 2 * centre + after  # < 0 at a proper maximum
        vertex = 0.5 * (before - after) / curvature.clamp_max(-1e-6)
        return torch.where((curvature < -1e-6) & (peak > 0), vertex.clamp(-0.5, 0.5), torch.zeros_like(vertex))

    x = col + 0.5 + offset(at(0, -1), at(0, 1))
    y = row + 0.5 + offset(at(-1, 0), at(1, 0))
    return torch.stack([x, y, peak.clamp(0, 1)], dim=-1)


@TASKS.register("keypoints")
class Keypoints(DenseTask):
    """``num_points`` points per image; targets ``{"keypoints": float32 (P, 3)}`` as ``x, y, v``.

    Args:
        num_points: Points per image (one heatmap each).
        sigma: Standard deviation of the target Gaussians, in input pixels (2 suits 64 px images).
        width: Decoder width.
        flip_pairs: ``(left, right)`` point indices a horizontal flip swaps (augmentation only).
    """

    name = "keypoints"
    metric = "nme"  # the headline metric; the accumulator comes from build_metric()
    higher_is_better = False
    target_keys = ("keypoints",)

    @classmethod
    def for_classes(cls, classes: Sequence[str]) -> Keypoints:
        raise ValueError("keypoints is sized by its source's points, not by classes: build_task('keypoints', source)")

    @classmethod
    def for_source(cls, source) -> Keypoints:
        """The task for a labeled source with ``num_points`` (and ``keypoint_flip_pairs``, if any)."""
        if getattr(source, "num_points", None) is None:
            raise ValueError(f"{source.uri!r} has no keypoints to size the keypoints task by")
        return cls(int(source.num_points), flip_pairs=getattr(source, "keypoint_flip_pairs", ()))

    def __init__(
        self, num_points: int, *, sigma: float = 2.0, width: int = 32, flip_pairs: Sequence[tuple[int, int]] = ()
    ) -> None:
        if num_points < 1:
            raise ValueError(f"keypoints needs at least 1 point, got {num_points}")
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.num_points = num_points
        self.sigma = sigma
        self.width = width
        self.flip_pairs = tuple((int(a), int(b)) for a, b in flip_pairs)

    @property
    def num_classes(self) -> int:
        """Output channels, one heatmap per point: what a saved network spec records."""
        return self.num_points

    def check_source(self, source, where: str) -> None:
        """Also checks that the source has this task's number of points."""
        super().check_source(source, where)
        if getattr(source, "num_points", None) != self.num_points:
            raise ValueError(f"{where}={source.uri!r} has {getattr(source, 'num_points', '?')} keypoints per image, "
                             f"the labeled source {self.num_points}")  # fmt: skip

    def augment(self, aug, images: torch.Tensor, targets):
        """Augments the images and moves the points with them; mirrored images swap the flip pairs."""
        return aug.forward_dense(images, targets, flip_pairs=self.flip_pairs)

    def build_head(self, channels: Sequence[int], strides: Sequence[int]) -> nn.Module:
        """FPN decoder + 1x1 predictor: pyramid -> heatmaps (B, P, H, W)."""
        return DenseHead(channels, strides, self.num_points, self.width)

    def loss(self, outputs: torch.Tensor, targets: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Per-sample heatmap MSE (B,): the mean over visible points (``v > 0``) of each map's pixel mean.

        Missing points are left out entirely, so the net is not taught that a hidden point is nowhere;
        an image without a visible point gives 0.
        """
        points = torch.stack([t["keypoints"] for t in targets]).to(outputs.device).float()  # (B, P, 3)
        if points.shape[1] != outputs.shape[1]:
            raise ValueError(f"{points.shape[1]} target points but {outputs.shape[1]} heatmaps")
        target = gaussian_heatmaps(points, outputs.shape[-2], outputs.shape[-1], self.sigma)
        per_point = ((outputs.float() - target) ** 2).flatten(2).mean(dim=2)  # (B, P)
        visible = points[..., 2] > 0
        return (per_point * visible).sum(dim=1) / visible.sum(dim=1).clamp_min(1)

    def predict(self, outputs: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Heatmaps -> one ``{"keypoints": (P, 3)}`` per image with ``v`` = confidence (peak value)."""
        return [{"keypoints": k} for k in decode_heatmaps(outputs.detach())]

    def encode_pseudo(self, outputs: torch.Tensor, *, threshold: float = 0.5) -> list[dict[str, torch.Tensor]]:
        """Teacher heatmaps -> pseudo points, ``v`` = confidence, and ``v = 0`` where it is < ``threshold``."""
        points = decode_heatmaps(outputs.detach())
        points[..., 2] = points[..., 2].masked_fill(points[..., 2] < threshold, 0.0)
        return [{"keypoints": k.cpu()} for k in points]

    def build_metric(self) -> KeypointMeter:
        """A fresh NME accumulator (percent of the target points' bounding-box diagonal)."""
        return KeypointMeter()

    # ------------------------------------------------------------------ pseudo-label store

    def pseudo_options(self, label_cfg) -> dict:
        return {"threshold": label_cfg.point_threshold}

    def pseudo_schema(self) -> dict[str, pa.DataType]:
        return {"keypoints.points": pa.list_(pa.float32()), "keypoints.confidence": pa.float32()}

    def record_columns(self, targets: Sequence[dict[str, torch.Tensor]]) -> dict[str, list]:
        return {"keypoints.points": [t["keypoints"].reshape(-1).tolist() for t in targets]}  # x, y, v per point

    def record_confidence(self, outputs: torch.Tensor, targets) -> np.ndarray:
        """The mean over points of the teacher's heatmap peaks, points under the threshold included."""
        return outputs.detach().float().flatten(2).amax(dim=2).clamp(0, 1).mean(dim=1).cpu().numpy()

    def decode_rows(self, table: pa.Table) -> list[dict[str, torch.Tensor]]:
        return [{"keypoints": torch.tensor(p, dtype=torch.float32).reshape(-1, 3)}
                for p in table.column("keypoints.points").to_pylist()]  # fmt: skip

    def quality_meter(self) -> PseudoPointQuality:
        """NME of the kept pseudo points and of all of them, and the share of points kept (percent)."""
        return PseudoPointQuality()
