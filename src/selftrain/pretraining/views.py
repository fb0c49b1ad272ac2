"""Random views of a batch for self-supervised pre-training, after lightly's view transforms.

The recipe is lightly's ``SimCLRViewTransform`` / ``SwaVViewTransform`` (random resized crop,
horizontal flip, colour jitter with p 0.8, random grayscale with p 0.2, optional Gaussian blur),
but applied to whole batches with kornia, which draws independent parameters for every sample:
lightly's transforms work on one PIL image at a time, which on a CPU costs more than the training
step of a small CNN (see :mod:`selftrain.augment`). Grayscale images get brightness and contrast
jitter only: saturation, hue and grayscale conversion mean nothing for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ViewSpec:
    """``count`` views of side ``size`` cropped from ``scale`` of the image's area."""

    size: int
    scale: tuple[float, float]
    count: int = 1


class ViewAugment(nn.Module):
    """One random view of every image of a float batch (B, C, H, W) in [0, 1] -> (B, C, size, size)."""

    def __init__(self, size: int, scale: tuple[float, float], channels: int, jitter: float, blur: float) -> None:
        super().__init__()
        import kornia.augmentation as K

        ops: list[nn.Module] = [
            K.RandomResizedCrop((size, size), scale=tuple(scale), cropping_mode="resample"),
            K.RandomHorizontalFlip(),
        ]
        if jitter > 0:
            color = (0.8 * jitter, 0.2 * jitter) if channels == 3 else (0.0, 0.0)
            ops.append(K.ColorJitter(0.8 * jitter, 0.8 * jitter, color[0], color[1], p=0.8))
        if channels == 3:
            ops.append(K.RandomGrayscale(p=0.2))
        if blur > 0:
            kernel = max(3, (size // 10) | 1)  # lightly: sigma 0.1-2 with a kernel of ~10% of the side
            ops.append(K.RandomGaussianBlur((kernel, kernel), sigma=(0.1, 2.0), p=blur))
        self.ops = nn.Sequential(*ops)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.ops(images).clamp_(0, 1)


class MultiView(nn.Module):
    """All the views a method needs, in the order of its specs: e.g. 2 global then 6 local crops."""

    def __init__(self, specs: list[ViewSpec], channels: int, jitter: float, blur: float) -> None:
        super().__init__()
        self.specs = list(specs)
        self.augments = nn.ModuleList(ViewAugment(s.size, s.scale, channels, jitter, blur) for s in self.specs)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        views = []
        for spec, augment in zip(self.specs, self.augments):
            views += [augment(images) for _ in range(spec.count)]
        return views
