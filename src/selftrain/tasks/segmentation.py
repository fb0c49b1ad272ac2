"""Semantic segmentation: per-pixel cross-entropy, mIoU, hard pseudo labels with an ignore index.

Pseudo labels follow Zoph et al. 2020 (Rethinking Pre-training and Self-training): the teacher's
per-pixel argmax, with pixels whose softmax confidence is under a threshold set to
:data:`~selftrain.data.targets.IGNORE_INDEX`, so the student never learns the teacher's guesses.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from selftrain.data.targets import IGNORE_INDEX
from selftrain.metrics import SegmentationIoU
from selftrain.tasks import TASKS
from selftrain.tasks.decoder import DenseHead
from selftrain.tasks.dense import DenseTask, map_to_bytes, maps_from_column, stack_key


class SegmentationMeter(SegmentationIoU):
    """:class:`SegmentationIoU` that also takes the tasks' lists of ``{"mask": (H, W)}`` dicts."""

    def update(self, preds: torch.Tensor | Sequence[dict], targets: torch.Tensor | Sequence[dict]) -> None:
        super().update(stack_key(preds, "mask"), stack_key(targets, "mask"))


class PseudoMaskQuality(SegmentationMeter):
    """mIoU of pseudo masks against the true ones over the pixels the pseudo masks label, and
    ``coverage``: the percentage of pixels they label (the rest fell under the pixel threshold)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes)
        self.labelled, self.pixels = 0, 0

    def update(self, preds: Sequence[dict], targets: Sequence[dict]) -> None:
        pred = torch.stack([p["mask"] for p in preds])
        truth = torch.stack([t["mask"] for t in targets])
        ignored = pred == IGNORE_INDEX
        self.labelled += int((~ignored).sum())
        self.pixels += pred.numel()
        super().update(pred.masked_fill(ignored, 0), truth.masked_fill(ignored, IGNORE_INDEX))

    def compute(self) -> dict[str, float]:
        coverage = 100 * self.labelled / max(self.pixels, 1)
        if self.labelled == 0:
            return {"coverage": coverage}
        return {**super().compute(), "coverage": coverage}


@TASKS.register("segmentation")
class Segmentation(DenseTask):
    """One class per pixel out of ``num_classes``, background included (scenes: mask value 0).

    Outputs are logits (B, K, H, W) at the input resolution; targets are ``{"mask": int64 (H, W)}``
    with :data:`IGNORE_INDEX` for unlabelled pixels. In a run, a source's mask value 0 is the
    background and ``c + 1`` its object class ``c`` (the scenes' convention), so ``K`` is the
    number of object classes plus one.
    """

    name = "segmentation"
    metric = "miou"  # the headline metric; the accumulator comes from build_metric()
    higher_is_better = True
    target_keys = ("mask",)

    @classmethod
    def for_classes(cls, classes: Sequence[str]) -> Segmentation:
        return cls(len(classes) + 1)  # background + the object classes

    def check_source(self, source, where: str) -> None:
        """Also checks the mask convention: value 0 = background, ``c + 1`` = object class ``c``.

        A source declares what its mask values mean in ``mask_classes`` (scenes:, voc: and coco:
        sources give ``["background", *classes]``); one that declares nothing, or another
        mapping, is refused rather than trained on classes shifted by one.
        """
        super().check_source(source, where)
        declared = getattr(source, "mask_classes", None)
        expected = ["background", *(source.classes or [])]
        if declared is None or list(declared) != expected:
            what = "does not say what its mask values mean" if declared is None else f"has mask values {declared!r}"
            raise ValueError(
                f"{where}={source.uri!r} {what}; a segmentation run needs mask value 0 = background and "
                f"c + 1 = class c, i.e. mask_classes {expected!r} (the convention of scenes:, voc: and coco: sources)"
            )

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

    # ------------------------------------------------------------------ pseudo-label store

    def pseudo_options(self, label_cfg) -> dict:
        return {"threshold": label_cfg.pixel_threshold}

    def pseudo_schema(self) -> dict[str, pa.DataType]:
        return {"segmentation.mask": pa.binary(), "segmentation.height": pa.int32(), "segmentation.width": pa.int32(),
                "segmentation.confidence": pa.float32()}  # fmt: skip

    def record_columns(self, targets: Sequence[dict[str, torch.Tensor]]) -> dict[str, list]:
        masks = [t["mask"] for t in targets]
        return {
            "segmentation.mask": [map_to_bytes(m, np.uint8) for m in masks],  # classes < 255 = IGNORE_INDEX
            "segmentation.height": [int(m.shape[0]) for m in masks],
            "segmentation.width": [int(m.shape[1]) for m in masks],
        }

    def record_confidence(self, outputs: torch.Tensor, targets) -> np.ndarray:
        """The mean over pixels of the teacher's softmax confidence, per image."""
        return F.softmax(outputs.float(), dim=1).amax(dim=1).flatten(1).mean(dim=1).cpu().numpy()

    def decode_rows(self, table: pa.Table) -> list[dict[str, torch.Tensor]]:
        return [{"mask": torch.from_numpy(m.astype(np.int64))} for m in maps_from_column(table, "segmentation.mask", np.uint8)]

    def quality_meter(self) -> PseudoMaskQuality:
        """mIoU of pseudo masks over the pixels they label, and their coverage (percent)."""
        return PseudoMaskQuality(self.num_classes)
