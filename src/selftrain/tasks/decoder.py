"""A light FPN-style decoder and the dense head built on it, shared by the per-pixel tasks.

Lin et al. 2017 (Feature Pyramid Networks): 1x1 lateral convolutions bring every level to one
width, a top-down pass adds each upsampled coarser map to the next finer one, and a 3x3
convolution smooths the result. Only the finest merged map is needed by a per-pixel predictor,
so only that one is smoothed; the head then upsamples its prediction to the input resolution.
At 64 px with width 32 this costs a few tens of MFLOPs per image, cheap on a CPU.

Why not :class:`torchvision.ops.FeaturePyramidNetwork`: it smooths and returns every level, and a
per-pixel head reads only the finest, so the other levels' 3x3 convolutions would be parameters
that never get a gradient (wasted compute, and an error under DDP without ``find_unused_parameters``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class FPNDecoder(nn.Module):
    """Merges a fine-to-coarse feature pyramid into one map at the finest stride.

    Args:
        channels: Channels of each pyramid level, fine to coarse.
        width: Channels of the merged map (the decoder's only size knob).
    """

    def __init__(self, channels: Sequence[int], width: int = 32) -> None:
        super().__init__()
        if not channels:
            raise ValueError("the decoder needs at least one feature level")
        self.width = width
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.smooth = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Pyramid maps fine to coarse -> (B, width, H0, W0), the size of the finest map."""
        if len(features) != len(self.lateral):
            raise ValueError(f"expected {len(self.lateral)} feature maps, got {len(features)}")
        x = self.lateral[-1](features[-1])
        for lateral, fine in zip(reversed(self.lateral[:-1]), reversed(features[:-1])):
            # Nearest upsampling to the exact size: odd sizes (e.g. timm strides on 63 px) still line up.
            x = lateral(fine) + F.interpolate(x, size=fine.shape[-2:], mode="nearest")
        return self.smooth(x)


class DenseHead(nn.Module):
    """FPN decoder + 1x1 predictor, upsampled (bilinear) to the input resolution.

    Args:
        channels: Channels of each pyramid level, fine to coarse.
        strides: Stride of each level; the finest one sets the output upsampling.
        out_channels: Channels predicted per pixel (classes, 1 for depth, points for heatmaps).
        width: Decoder width.
    """

    def __init__(self, channels: Sequence[int], strides: Sequence[int], out_channels: int, width: int = 32) -> None:
        super().__init__()
        if len(channels) != len(strides):
            raise ValueError(f"{len(channels)} channel counts but {len(strides)} strides")
        self.stride = int(strides[0])
        self.decoder = FPNDecoder(channels, width)
        self.predictor = nn.Conv2d(width, out_channels, 1)

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int] | None = None) -> torch.Tensor:
        """Pyramid maps -> (B, out_channels, H, W) at ``size``, default finest map size x finest stride."""
        out = self.predictor(self.decoder(features))  # (B, C, H0, W0)
        if size is None:
            size = (out.shape[-2] * self.stride, out.shape[-1] * self.stride)
        if tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out


class PooledHead(nn.Module):
    """A linear layer on the average-pooled coarsest pyramid level: pyramid -> (B, out_features).

    The head of the face tasks with one vector per image (action-unit intensities, expression
    logits and valence/arousal, 3D points, identity embeddings); with a frozen backbone it is a
    linear probe.
    """

    def __init__(self, channels: Sequence[int], out_features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(int(channels[-1]), out_features)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.fc(features[-1].mean(dim=(2, 3)))  # (B, C, h, w) -> (B, out_features)
