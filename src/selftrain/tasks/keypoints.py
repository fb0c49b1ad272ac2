"""Keypoints / landmarks: Gaussian heatmap regression, NME, pseudo points with per-point confidence.

Heatmaps as in Xiao et al. 2018 ("Simple Baselines for Human Pose Estimation and Tracking"): the
head predicts one map per point at the input resolution (stride 1), trained with mean squared
error against a Gaussian (peak 1, ``sigma`` pixels) centred on the point. A map is decoded by its
argmax, refined to sub-pixel precision by a parabola fit to its log values, and its peak value is
the point's confidence. Pseudo labels (MuST, Ghiasi et al. 2021: "coordinates + per-point
confidence") are the teacher's decoded points with ``v`` = confidence, and ``v = 0`` (missing) for
points under a threshold.

Coordinates follow :mod:`selftrain.data.targets`: ``x, y`` in pixels of the image, where pixel
column ``j`` spans ``[j, j + 1)``, so its centre is ``x = j + 0.5``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from selftrain.metrics import KeypointNME
from selftrain.tasks import TASKS
from selftrain.tasks.decoder import DenseHead
from selftrain.tasks.dense import stack_key


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
class Keypoints:
    """``num_points`` points per image; targets ``{"keypoints": float32 (P, 3)}`` as ``x, y, v``.

    Args:
        num_points: Points per image (one heatmap each).
        sigma: Standard deviation of the target Gaussians, in input pixels (2 suits 64 px images).
        width: Decoder width.
    """

    name = "keypoints"
    metric = "nme"  # the headline metric; the accumulator comes from build_metric()
    higher_is_better = False

    def __init__(self, num_points: int, *, sigma: float = 2.0, width: int = 32) -> None:
        if num_points < 1:
            raise ValueError(f"keypoints needs at least 1 point, got {num_points}")
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.num_points = num_points
        self.sigma = sigma
        self.width = width

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
