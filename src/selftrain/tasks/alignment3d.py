"""3D face alignment (AFLW2000-3D): 68 points ``x, y, z`` regressed from the pooled features.

The head regresses the ``3P`` coordinates directly, in units of the image side and centred on the
image (``x = (u + 0.5) W``), a simple baseline where 3DDFA fits a 3D morphable model; on the
small images this toolkit trains on CPUs, a heatmap head would need a map per point and a depth
read-out. The loss is the per-image mean L1 error over ``sqrt(w h)`` of the true 2D box. Augmentation
moves ``x, y`` with the image (the points travel as keypoints, so a flip swaps the 68-point
left/right pairs) and scales ``z`` by the warp's scale ``sqrt(|det A|)``, so the face keeps its
proportions. Pseudo labels are the teacher's points (a regression output: no confidence, every
record 1; ``label.threshold`` must stay 0). Metrics: :func:`selftrain.metrics_faces.nme_3d`,
``nme`` on ``x, y`` (the 2D-projected error AFLW2000-3D tables report, the headline) and
``nme_3d`` on ``x, y, z``, both normalised by ``sqrt(w h)`` of the true 2D box.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from selftrain.augment import warp_targets
from selftrain.metrics_faces import nme_3d
from selftrain.tasks import TASKS
from selftrain.tasks.decoder import PooledHead
from selftrain.tasks.dense import DenseTask, SetMeter, stack_key, vector_column


class PointsHead(nn.Module):
    """Pooled features -> ``(B, P, 3)`` points in input pixels (the input size read off the pyramid)."""

    def __init__(self, channels: Sequence[int], strides: Sequence[int], num_points: int) -> None:
        super().__init__()
        self.num_points, self.stride = num_points, int(strides[0])
        self.linear = PooledHead(channels, 3 * num_points)

    def forward(self, features) -> torch.Tensor:
        height, width = (s * self.stride for s in features[0].shape[-2:])  # the input size
        unit = self.linear(features).view(-1, self.num_points, 3)
        scale = torch.tensor([width, height, width], dtype=unit.dtype, device=unit.device)
        return (unit + 0.5) * scale  # (B, P, 3) in pixels; z in units of the width


def _nme_both(preds: Sequence[dict], targets: Sequence[dict]) -> dict[str, float]:
    pred, truth = stack_key(preds, "points3d"), stack_key(targets, "points3d")
    return {"nme": nme_3d(pred[..., :2], truth[..., :2])["nme"], "nme_3d": nme_3d(pred, truth)["nme"]}


@TASKS.register("alignment3d")
class Alignment3D(DenseTask):
    """``num_points`` 3D points per image; targets ``{"points3d": float32 (P, 3)}``."""

    name = "alignment3d"
    metric = "nme"
    higher_is_better = False
    needs_classes = False
    target_keys = ("points3d",)

    def __init__(self, num_points: int, *, flip_pairs: Sequence[tuple[int, int]] = ()) -> None:
        if num_points < 1:
            raise ValueError(f"alignment3d needs at least 1 point, got {num_points}")
        self.num_points = num_points
        self.flip_pairs = tuple((int(a), int(b)) for a, b in flip_pairs)

    @classmethod
    def for_classes(cls, classes: Sequence[str]) -> Alignment3D:
        raise ValueError("alignment3d is sized by its source's points, not by classes: build_task('alignment3d', source)")

    @classmethod
    def for_source(cls, source) -> Alignment3D:
        if "points3d" not in getattr(source, "target_keys", ()):
            raise ValueError(f"{source.uri!r} has no 3D points to size the alignment3d task by (use aflw3d:DIR)")
        return cls(int(source.num_points), flip_pairs=getattr(source, "keypoint_flip_pairs", ()))

    @property
    def num_classes(self) -> int:
        return self.num_points

    def build_head(self, channels: Sequence[int], strides: Sequence[int]) -> nn.Module:
        return PointsHead(channels, strides, self.num_points)

    def augment(self, aug, images: torch.Tensor, targets):
        """Moves ``x, y`` with the image (flip pairs swapped) and scales ``z`` by the warp's scale."""
        images, steps = aug.forward_with_warps(images)
        if not steps:
            return images, [dict(t) for t in targets]
        points = [t["points3d"] for t in targets]
        as_keypoints = [{"keypoints": torch.cat([p[:, :2], torch.ones_like(p[:, :1])], dim=1)} for p in points]
        moved = warp_targets(as_keypoints, steps, images.shape[-2:], self.flip_pairs)
        total = steps[0]
        for step in steps[1:]:
            total = step @ total
        det = torch.linalg.det(total[:, :2, :2].float()).cpu()  # (B,)
        out = []
        for k, (p, m) in enumerate(zip(points, moved)):
            z = p[:, 2].clone()
            if det[k] < 0 and self.flip_pairs:  # mirrored: z follows its point's new index
                order = torch.arange(len(z))
                for a, b in self.flip_pairs:
                    order[a], order[b] = b, a
                z = z[order]
            out.append({"points3d": torch.cat([m["keypoints"][:, :2], (z * det[k].abs().sqrt())[:, None]], dim=1)})
        return images, out

    def loss(self, outputs: torch.Tensor, targets: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Per-image mean L1 error of the coordinates over ``sqrt(w h)`` of the true 2D box (B,),
        the normaliser of the metric, so every face weighs the same whatever its size."""
        target = stack_key(list(targets), "points3d").to(outputs.device).float()
        extent = target[..., :2].amax(dim=1) - target[..., :2].amin(dim=1)  # (B, 2)
        norm = extent.prod(dim=1).clamp_min(1.0).sqrt()
        return (outputs.float() - target).abs().mean(dim=(1, 2)) / norm

    def predict(self, outputs: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return [{"points3d": p} for p in outputs.detach().float().cpu()]

    def build_metric(self) -> SetMeter:
        return SetMeter(_nme_both)

    # ------------------------------------------------------------------ pseudo-label store

    def encode_pseudo(self, outputs: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return self.predict(outputs)

    def pseudo_schema(self) -> dict[str, pa.DataType]:
        return {"alignment3d.points": pa.list_(pa.float32()), "alignment3d.confidence": pa.float32()}

    def record_columns(self, targets) -> dict[str, list]:
        return {"alignment3d.points": [t["points3d"].reshape(-1).tolist() for t in targets]}

    def record_confidence(self, outputs, targets) -> np.ndarray:
        return np.ones(len(targets), dtype=np.float32)  # a regression output has no confidence

    def decode_rows(self, table: pa.Table) -> list[dict[str, torch.Tensor]]:
        rows = vector_column(table, "alignment3d.points", "points3d", 3 * self.num_points)
        return [{"points3d": r["points3d"].view(self.num_points, 3)} for r in rows]

    def quality_meter(self) -> SetMeter:
        return self.build_metric()
