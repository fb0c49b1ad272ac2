"""Supervised pre-training: a linear classifier on the pooled features, cross-entropy on every label."""

from __future__ import annotations

import torch
from torch import nn

from selftrain.augment import BatchAugment
from selftrain.pretraining import METHODS, Method


@METHODS.register("supervised")
class Supervised(Method):
    """The classic ImageNet-style initialization (Zoph et al. 2020 compare it with self-training).

    One view per image, augmented with ``pretrain.augment`` (S1-S4); the classifier is dropped on
    export, so only the backbone moves on.
    """

    needs_labels = True

    def __init__(self, backbone: nn.Module, cfg, *, num_classes: int, **kwargs) -> None:
        if num_classes < 2:
            raise ValueError(f"pretrain.data={cfg.data!r}: supervised pre-training needs a source with classes")
        super().__init__(backbone, cfg, num_classes=num_classes, **kwargs)
        self.classifier = nn.Linear(self.dim, num_classes)

    def build_views(self) -> nn.Module:
        return BatchAugment(self.cfg.augment)

    def views(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.augment(images)]

    def loss(self, views, labels, step):
        feats = self.features(views[0])
        return nn.functional.cross_entropy(self.classifier(feats), labels), feats
