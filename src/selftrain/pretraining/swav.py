"""SwAV: Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments", NeurIPS 2020; multi-crop and the FRL defaults of Bulat et al. 2021."""

from __future__ import annotations

import torch
from lightly.loss import SwaVLoss
from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
from torch import nn

from selftrain.pretraining import METHODS, Method
from selftrain.pretraining.views import ViewSpec


@METHODS.register("swav")
class SwAV(Method):
    """Swapped prediction of Sinkhorn cluster codes over ``pretrain.swav.prototypes`` prototypes.

    Codes come from the global crops only; every crop (global and local) predicts the codes of
    the other global crops (lightly's :class:`~lightly.loss.SwaVLoss`).
    """

    def __init__(self, backbone, cfg, **kwargs) -> None:
        super().__init__(backbone, cfg, **kwargs)
        o = cfg.swav
        self.head = SwaVProjectionHead(self.dim, cfg.hidden_dim, cfg.projection_dim)
        self.prototypes = SwaVPrototypes(cfg.projection_dim, n_prototypes=o.prototypes)
        # Under torchrun the Sinkhorn codes balance the prototypes over the global batch, as in one process.
        self.criterion = SwaVLoss(o.temperature, o.sinkhorn_iterations, o.sinkhorn_epsilon, sinkhorn_gather_distributed=True)

    def view_specs(self) -> list[ViewSpec]:
        o = self.cfg.swav
        specs = [ViewSpec(self.image_size, tuple(o.global_scale), o.global_crops)]
        if o.local_crops:
            specs.append(ViewSpec(max(4, round(o.local_size * self.image_size)), tuple(o.local_scale), o.local_crops))
        return specs

    def _scores(self, crops: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Prototype scores (B, K) of each crop, from one backbone pass over the crops of one size."""
        feats = self.features(torch.cat(crops))
        z = nn.functional.normalize(self.head(feats), dim=1)
        return list(self.prototypes(z).chunk(len(crops))), feats

    def loss(self, views, labels, step):
        self.prototypes.normalize()  # prototypes stay on the unit sphere (SwAV)
        n = self.cfg.swav.global_crops
        high, feats = self._scores(views[:n])
        low = self._scores(views[n:])[0] if len(views) > n else []
        return self.criterion(high, low), feats[: len(views[0])]
