"""Monocular depth: per-pixel log-depth regression with the scale-invariant log loss.

Loss (Eigen, Puhrsch and Fergus 2014, "Depth Map Prediction from a Single Image using a
Multi-Scale Deep Network", eq. 4): with ``d_i = log p_i - log t_i`` over the ``n`` valid pixels
(target ``> 0``) of one image,

    L = mean(d_i^2) - lambda * mean(d_i)^2,   lambda = 0.5 by default.

Why this loss: regressing *log* depth makes errors relative (an error of 10% weighs the same near
and far, matching AbsRel); ``lambda = 0.5`` (the paper's training value) halves the penalty on a
global scale offset, so learning the scene layout is not dominated by getting the absolute scale
right, while the scale is still learnt (``lambda = 1`` would leave it free, and AbsRel, which is not
scale-aligned here, would suffer). ``lambda = 0`` is plain MSE on log depth.

The head predicts log depth, so predictions ``exp(output)`` are always positive and the loss needs
no log of a prediction. Pseudo targets are the teacher's depth maps (Ghiasi et al. 2021, MuST).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from selftrain.metrics import DepthErrors
from selftrain.tasks import TASKS
from selftrain.tasks.decoder import DenseHead
from selftrain.tasks.dense import DenseTask, map_to_bytes, maps_from_column, stack_key

#: Log-depth outputs are clamped to this range before ``exp`` so a wild early head cannot overflow.
LOG_DEPTH_RANGE = (-10.0, 10.0)


class DepthMeter(DepthErrors):
    """:class:`DepthErrors` that also takes the tasks' lists of ``{"depth": (H, W)}`` dicts."""

    def update(self, preds: torch.Tensor | Sequence[dict], targets: torch.Tensor | Sequence[dict]) -> None:
        super().update(stack_key(preds, "depth"), stack_key(targets, "depth"))


@TASKS.register("depth")
class Depth(DenseTask):
    """One positive depth per pixel; targets ``{"depth": float32 (H, W)}`` with 0 = no value.

    Args:
        num_classes: Ignored (depth always has one output); accepted so that every task is built
            the same way, ``TASKS.get(name)(num_classes)``.
        silog_lambda: The ``lambda`` of the scale-invariant loss (see the module docstring).
        width: Decoder width.
    """

    name = "depth"
    metric = "absrel"  # the headline metric; the accumulator comes from build_metric()
    higher_is_better = False
    target_keys = ("depth",)
    needs_classes = False  # depth: sources such as depth:ROOT name no classes
    #: One output channel; the size a saved network spec records for depth.
    num_classes = 1

    @classmethod
    def for_classes(cls, classes: Sequence[str]) -> Depth:
        return cls()

    def __init__(self, num_classes: int | None = None, *, silog_lambda: float = 0.5, width: int = 32) -> None:
        if not 0.0 <= silog_lambda <= 1.0:
            raise ValueError(f"silog_lambda must lie in [0, 1], got {silog_lambda}")
        self.silog_lambda = silog_lambda
        self.width = width

    def build_head(self, channels: Sequence[int], strides: Sequence[int]) -> nn.Module:
        """FPN decoder + 1x1 regressor: pyramid -> log depth (B, 1, H, W)."""
        return DenseHead(channels, strides, 1, self.width)

    def loss(self, outputs: torch.Tensor, targets: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Per-sample scale-invariant log loss (B,) over valid pixels; an image without one gives 0."""
        depth = torch.stack([t["depth"] for t in targets]).to(outputs.device).float()  # (B, H, W)
        valid = depth > 0
        d = (outputs[:, 0].float() - depth.clamp_min(1e-6).log()) * valid  # (B, H, W), 0 where invalid
        n = valid.flatten(1).sum(1).clamp_min(1)
        mean_sq = (d**2).flatten(1).sum(1) / n
        mean = d.flatten(1).sum(1) / n
        return mean_sq - self.silog_lambda * mean**2

    def depth(self, outputs: torch.Tensor) -> torch.Tensor:
        """Log-depth outputs (B, 1, H, W) -> positive depth (B, H, W)."""
        return outputs[:, 0].float().clamp(*LOG_DEPTH_RANGE).exp()

    def predict(self, outputs: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Outputs -> one ``{"depth": float32 (H, W)}`` per image, every value > 0."""
        return [{"depth": d} for d in self.depth(outputs)]

    def encode_pseudo(self, outputs: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Teacher outputs -> its depth maps as regression targets (every pixel valid)."""
        return [{"depth": d.cpu()} for d in self.depth(outputs).detach()]

    def build_metric(self) -> DepthMeter:
        """A fresh accumulator of ``absrel``, ``rmse`` and ``delta1``."""
        return DepthMeter()

    # ------------------------------------------------------------------ pseudo-label store

    def pseudo_schema(self) -> dict[str, pa.DataType]:
        return {"depth.depth": pa.binary(), "depth.height": pa.int32(), "depth.width": pa.int32(),
                "depth.confidence": pa.float32()}  # fmt: skip

    def record_columns(self, targets: Sequence[dict[str, torch.Tensor]]) -> dict[str, list]:
        maps = [t["depth"] for t in targets]
        return {
            "depth.depth": [map_to_bytes(d, np.float16) for d in maps],  # half the bytes; ~0.05% relative error
            "depth.height": [int(d.shape[0]) for d in maps],
            "depth.width": [int(d.shape[1]) for d in maps],
        }

    def record_confidence(self, outputs, targets) -> np.ndarray:
        """1 for every record: a depth map has no confidence, so ``label.threshold`` must stay 0."""
        return np.ones(len(targets), dtype=np.float32)

    def decode_rows(self, table: pa.Table) -> list[dict[str, torch.Tensor]]:
        return [{"depth": torch.from_numpy(d.astype(np.float32))} for d in maps_from_column(table, "depth.depth", np.float16)]
