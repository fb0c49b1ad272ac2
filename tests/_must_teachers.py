"""Callable teachers for tests/test_must.py (``callable:_must_teachers:NAME``): deterministic rules on pixels."""

from __future__ import annotations

import torch

#: The class every image gets from :func:`always_class_two`.
CLASS = 2


def always_class_two(images: torch.Tensor):
    """Classification over the 11 scene classes: class 2 for every image, with confidence 0.8."""
    probs = torch.zeros(len(images), 11)
    probs[:, CLASS] = 1.0
    return [{"probs": p} for p in probs], torch.full((len(images),), 0.8)


def skips_odd(image: torch.Tensor) -> bool:
    """Whether :func:`bright_mask` gives no label: the image's pixel sum (as uint8 values) is odd."""
    return int(round(float(image.sum()) * 255)) % 2 == 1


def bright_mask(images: torch.Tensor):
    """Segmentation: bright pixels (> 0.5) are class 3 (mask value 3), dim ones (0.3-0.5) ignored, the
    rest background; no label for images with an odd pixel sum. Confidence: the share of labelled pixels."""
    targets, confidence = [], []
    for x in images:
        if skips_odd(x):
            targets.append(None)
            confidence.append(0.0)
            continue
        v = x[0]
        mask = torch.where(v > 0.5, 3, 0).long()
        mask[(v > 0.3) & (v <= 0.5)] = 255
        targets.append({"mask": mask})
        confidence.append(float((mask != 255).float().mean()))
    return targets, torch.tensor(confidence)


def wrong_keys(images: torch.Tensor):
    """A broken teacher: segmentation labels under the wrong key."""
    return [{"masks": torch.zeros(images.shape[-2:], dtype=torch.long)} for _ in images], torch.ones(len(images))
