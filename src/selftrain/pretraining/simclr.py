"""SimCLR: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of
Visual Representations", ICML 2020."""

from __future__ import annotations

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead

from selftrain.pretraining import METHODS, Method


@METHODS.register("simclr")
class SimCLR(Method):
    """Two views per image; NT-Xent pulls their projections together against the rest of the batch."""

    def __init__(self, backbone, cfg, **kwargs) -> None:
        super().__init__(backbone, cfg, **kwargs)
        self.head = SimCLRProjectionHead(self.dim, cfg.hidden_dim, cfg.projection_dim)
        # gather_distributed: under torchrun the negatives are the whole global batch, as in one process.
        self.criterion = NTXentLoss(temperature=cfg.simclr.temperature, gather_distributed=True)

    def loss(self, views, labels, step):
        # One pass over both views: batch norm sees all 2B images, as in SimCLR's global BN.
        feats = self.features(torch.cat(views[:2]))  # (2B, D)
        z0, z1 = self.head(feats).chunk(2)
        return self.criterion(z0, z1), feats[: len(views[0])]
