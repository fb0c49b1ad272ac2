"""MoCo v2: Chen, Fan, Girshick, He, "Improved Baselines with Momentum Contrastive Learning",
2020 (after He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020)."""

from __future__ import annotations

import copy

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule

from selftrain.pretraining import METHODS, Method


@METHODS.register("moco")
class MoCo(Method):
    """A query encoder, a momentum key encoder, and a queue of past keys as negatives.

    The queue is lightly's memory bank inside the loss, made a persistent buffer here, so it is
    saved and restored with every checkpoint. The EMA decay follows a cosine from
    ``pretrain.moco.momentum`` to 1.
    """

    def __init__(self, backbone, cfg, **kwargs) -> None:
        super().__init__(backbone, cfg, **kwargs)
        self.head = MoCoProjectionHead(self.dim, cfg.hidden_dim, cfg.projection_dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.head_momentum = copy.deepcopy(self.head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.head_momentum)
        # gather_distributed: under torchrun every rank's keys enter the queue, as in one process.
        self.criterion = NTXentLoss(
            temperature=cfg.moco.temperature, memory_bank_size=(cfg.moco.queue_size, cfg.projection_dim), gather_distributed=True
        )
        # lightly keeps the queue out of state_dict (non-persistent buffers); a resumed run needs it.
        bank = self.criterion.memory_bank
        for name in ("bank", "bank_ptr"):
            bank.register_buffer(name, getattr(bank, name), persistent=True)

    def loss(self, views, labels, step):
        m = cosine_schedule(step, self.steps, self.cfg.moco.momentum, 1.0)
        update_momentum(self.backbone, self.backbone_momentum, m)
        update_momentum(self.head, self.head_momentum, m)
        feats = self.features(views[0])
        query = self.head(feats)
        with torch.no_grad():
            key = self.head_momentum(self.features(views[1], self.backbone_momentum))
        return self.criterion(query, key), feats
