"""Semantic segmentation: per-pixel cross-entropy, mIoU, hard pseudo labels with an ignore index.

Pseudo labels follow Zoph et al. 2020 (Rethinking Pre-training and Self-training): the teacher's
per-pixel argmax, with pixels whose softmax confidence is under a threshold set to
:data:`~selftrain.data.targets.IGNORE_INDEX`, so the student never learns the teacher's guesses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from selftrain.data.targets import IGNORE_INDEX
from selftrain.metrics import SegmentationIoU
from selftrain.tasks import TASKS
from selftrain.tasks.decoder import DenseHead


class SegmentationMeter(SegmentationIoU):
    """:class:`SegmentationIoU` that also takes the tasks' lists of ``{"mask": (H, W)}`` dicts."""

    def update(self, preds: torch.Tensor | Sequence[dict], targets: torch.Tensor | Sequence[dict]) -> None:
        if not isinstance(preds, torch.Tensor):
            preds = torch.stack([p["mask"] for p in preds])
        if not isinstance(targets, torch.Tensor):
            targets = torch.stack([t["mask"] for t in targets])
        super().update(preds, targets)


@TASKS.register("segmentation")
class Segmentation:
    """One class per pixel out of ``num_classes``, background included (scenes: mask value 0).

    Outputs are logits (B, K, H, W) at the input resolution; targets are ``{"mask": int64 (H, W)}``
    with :data:`IGNORE_INDEX` for unlabelled pixels.
    """

    name = "segmentation"
    metric = "miou"  # the headline metric; the accumulator comes from build_metric()
    higher_is_better = True

    def __init__(self, num_classes: int, width: int = 32) -> None:
        if num_classes < 2:
            raise ValueError(f"segmentation needs at least 2 classes (background included), got {num_classes}")
        self.num_classes = num_classes
        self.width = width

    def build_head(self, channels: Sequence[int], strides: Sequence[int]) -> nn.Module:
        """FPN decoder + 1x1 classifier: pyramid -> logits (B, K, H, W)."""
        return DenseHead(channels, strides, self.num_classes, self.width)

    def loss(self, outputs: torch.Tensor, targets: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Per-sample cross-entropy (B,), the mean over each image's labelled pixels.

        Per image rather than over the batch, so the student can weigh human and pseudo samples;
        an image without a labelled pixel (all ignored) contributes 0.
        """
        mask = torch.stack([t["mask"] for t in targets]).to(outputs.device).long()  # (B, H, W)
        pixel = F.cross_entropy(outputs.float(), mask, ignore_index=IGNORE_INDEX, reduction="none")
        valid = (mask != IGNORE_INDEX).flatten(1).sum(1)
        return pixel.flatten(1).sum(1) / valid.clamp_min(1)

    def predict(self, outputs: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Logits -> one ``{"mask": int64 (H, W)}`` per image (argmax)."""
        return [{"mask": m} for m in outputs.argmax(dim=1)]

    def encode_pseudo(self, outputs: torch.Tensor, *, threshold: float = 0.5) -> list[dict[str, torch.Tensor]]:
        """Teacher logits -> hard pseudo masks; pixels with softmax confidence < ``threshold`` -> IGNORE_INDEX."""
        confidence, label = F.softmax(outputs.float(), dim=1).max(dim=1)  # (B, H, W) each
        label = label.masked_fill(confidence < threshold, IGNORE_INDEX)
        return [{"mask": m.cpu()} for m in label]

    def build_metric(self) -> SegmentationMeter:
        """A fresh accumulator of ``miou`` and ``pixel_acc`` (percent)."""
        return SegmentationMeter(self.num_classes)
