"""BYOL: Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning",
NeurIPS 2020."""

from __future__ import annotations

import copy

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule

from selftrain.pretraining import METHODS, Method


@METHODS.register("byol")
class BYOL(Method):
    """The online network predicts the momentum target's projection of the other view (symmetric loss)."""

    def __init__(self, backbone, cfg, **kwargs) -> None:
        super().__init__(backbone, cfg, **kwargs)
        self.projector = BYOLProjectionHead(self.dim, cfg.hidden_dim, cfg.projection_dim)
        self.predictor = BYOLPredictionHead(cfg.projection_dim, cfg.hidden_dim, cfg.projection_dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projector_momentum = copy.deepcopy(self.projector)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projector_momentum)
        self.criterion = NegativeCosineSimilarity()

    def loss(self, views, labels, step):
        m = cosine_schedule(step, self.steps, self.cfg.byol.momentum, 1.0)
        update_momentum(self.backbone, self.backbone_momentum, m)
        update_momentum(self.projector, self.projector_momentum, m)
        both = torch.cat(views[:2])
        feats = self.features(both)  # (2B, D)
        p0, p1 = self.predictor(self.projector(feats)).chunk(2)
        with torch.no_grad():
            z0, z1 = self.projector_momentum(self.features(both, self.backbone_momentum)).chunk(2)
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0)), feats[: len(views[0])]
