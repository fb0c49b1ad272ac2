"""A backbone plus the preprocessing it was trained with, saved and loaded together.

The network takes float images in [0, 1] at its own ``image_size`` and normalizes them
itself, so a teacher loaded from disk labels a pool correctly whoever built it.

For classification the network is the backbone with its classifier (logits out). For a dense
task (``spec.task`` segmentation, depth, detection, keypoints) it is the backbone's feature pyramid
(:func:`~selftrain.backbones.build_feature_backbone`) plus the task's head, and its outputs are
whatever that head gives (per-pixel logits, log depth, FCOS' dense box predictions, heatmaps).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from selftrain.backbones import build_backbone, build_feature_backbone
from selftrain.checkpoint import read_state_dict
from selftrain.tasks import TASKS


@dataclass
class NetworkSpec:
    """Everything needed to rebuild a network and feed it images (saved as ``model.json``)."""

    backbone: str
    num_classes: int  # the task's size: classes (segmentation: with the background); 1 for depth; points
    channels: int
    image_size: int
    mean: list[float]
    std: list[float]
    classes: list[str] = field(default_factory=list)
    task: str = "classification"


class Network(nn.Module):
    """``backbone(normalize(x))``, or ``head(backbone(normalize(x)))`` for a dense task.

    ``features(x)`` gives the pooled pre-logit features (classification only). For a dense task
    ``drop_rate`` is not used: the feature pyramid has no dropout layer.
    """

    def __init__(self, spec: NetworkSpec, drop_rate: float = 0.0, weights: str | None = None) -> None:
        super().__init__()
        self.spec = spec
        task = TASKS.get(spec.task)
        if getattr(task, "dense", False):
            self.backbone = build_feature_backbone(spec.backbone, in_chans=spec.channels, weights=weights)
            self.head = task(spec.num_classes).build_head(self.backbone.channels, self.backbone.strides)
        else:
            self.backbone = build_backbone(
                spec.backbone, num_classes=spec.num_classes, in_chans=spec.channels, drop_rate=drop_rate, weights=weights
            )
            self.head = None
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1))

    #: ``freeze_backbone``: only the head trains, and the backbone stays in eval mode (its batch-norm
    #: statistics are those of the init), so a frozen-backbone probe measures the init's features.
    frozen_backbone = False

    def freeze_backbone(self) -> list[nn.Parameter]:
        """Freezes the backbone for a head-only probe; returns the parameters left to train (the head's)."""
        if self.head is None:
            raise ValueError("teach.freeze_backbone is for tasks with a head on the feature pyramid; classification "
                             "probes a frozen backbone with transfer.protocols: [linear]")  # fmt: skip
        self.frozen_backbone = True
        self.backbone.requires_grad_(False)
        self.train(self.training)
        return list(self.head.parameters())

    def train(self, mode: bool = True) -> Network:
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor):
        if self.head is None:
            return self.backbone(self.normalize(x))  # (B, K)
        return self.head(self.backbone(self.normalize(x)))  # the task head's outputs

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is not None:
            raise ValueError(f"pooled features (linear / finetune protocols) are for classification, not {self.spec.task}")
        feats = self.backbone.forward_features(self.normalize(x))
        return self.backbone.forward_head(feats, pre_logits=True)  # (B, D)


def image_statistics(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a uint8 batch (B, C, H, W), for normalization."""
    x = images.float().div_(255)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return [round(v, 4) for v in mean.tolist()], [round(v, 4) for v in std.tolist()]


def load_network(path: str | Path, drop_rate: float = 0.0) -> Network:
    """Loads ``model.safetensors`` and its ``model.json`` spec into a :class:`Network`."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: its spec file {meta_path.name} is missing; was it written by selftrain?")
    meta = json.loads(meta_path.read_text())
    net = Network(NetworkSpec(**meta["spec"]), drop_rate=drop_rate)
    net.load_state_dict(read_state_dict(path))
    return net
