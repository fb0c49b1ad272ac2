"""Augmentation strengths S1-S4 of Zoph et al. 2020, applied to whole batches.

=========  ==========================================================================
strength   what it does (Zoph et al. 2020, §3.1)
=========  ==========================================================================
none       nothing
S1         horizontal flip + crop by small translation/scale jitter (0.9-1.1)
S2         S1 + AutoAugment (ImageNet policy)
S3         flip + large scale jitter (0.5-2.0) + AutoAugment
S4         flip + large scale jitter (0.5-2.0) + RandAugment (2 ops, magnitude 10)
=========  ==========================================================================

RandAugment uses the operations of Cubuk et al. 2020 (:data:`RANDAUGMENT_OPS`). kornia's
default list adds ``invert`` and ``solarize_add``, and we also leave out ``solarize``: on
dark-background images (Fashion-MNIST, MNIST) these flip most pixels, and with them a
student at 800 steps lost 3.5 points of accuracy instead of gaining (measured, 1% labels).

Why batches, and why kornia: per-sample torchvision v2 pipelines cost 170 us (S1) to 900 us
(S4) per 28 px image on one CPU core, more than the training step itself; kornia draws
independent parameters for every sample of a batch and applies them in a few vectorized
ops (20 us/image for S1). Geometric ops are one affine warp, so the same parameters can be
applied to dense targets (masks, depth, keypoints); photometric policies touch the image
only. Grayscale images go through colour policies as three equal channels and come back as
their mean.
"""

from __future__ import annotations

import torch
from torch import nn

from selftrain.config import AUGMENT_STRENGTHS


RANDAUGMENT_OPS = [
    [("auto_contrast", 0, 1)], [("equalize", 0, 1)], [("rotate", -30.0, 30.0)], [("posterize", 4.0, 8.0)],
    [("color", 0.1, 1.9)], [("contrast", 0.1, 1.9)], [("brightness", 0.1, 1.9)], [("sharpness", 0.1, 1.9)],
    [("shear_x", -0.3, 0.3)], [("shear_y", -0.3, 0.3)], [("translate_x", -0.1, 0.1)], [("translate_y", -0.1, 0.1)],
]  # fmt: skip


class BatchAugment(nn.Module):
    """Augments a float batch in [0, 1], shape (B, C, H, W), with per-sample random parameters."""

    def __init__(self, strength: str) -> None:
        super().__init__()
        if strength not in AUGMENT_STRENGTHS:
            raise ValueError(f"unknown augmentation strength {strength!r}; known: {', '.join(AUGMENT_STRENGTHS)}")
        import kornia.augmentation as K
        from kornia.augmentation.auto import AutoAugment, RandAugment

        self.strength = strength
        self.geometric: nn.Module | None = None
        self.photometric: nn.Module | None = None
        if strength == "none":
            return
        if strength in ("S1", "S2"):
            jitter = K.RandomAffine(degrees=0, translate=(0.125, 0.125), scale=(0.9, 1.1), p=1.0)
        else:  # large scale jitter
            jitter = K.RandomAffine(degrees=0, translate=(0.1, 0.1), scale=(0.5, 2.0), p=1.0)
        self.geometric = K.AugmentationSequential(K.RandomHorizontalFlip(), jitter)
        if strength in ("S2", "S3"):
            self.photometric = AutoAugment("imagenet")
        elif strength == "S4":
            self.photometric = RandAugment(n=2, m=10, policy=RANDAUGMENT_OPS)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.geometric is not None:
            images = self.geometric(images)
        if self.photometric is not None:
            gray = images.shape[1] == 1
            x = images.expand(-1, 3, -1, -1) if gray else images
            x = self.photometric(x).clamp_(0, 1)
            images = x.mean(dim=1, keepdim=True) if gray else x
        return images

    def extra_repr(self) -> str:
        return f"strength={self.strength}"
