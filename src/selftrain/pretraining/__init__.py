"""Pre-training methods, by the name ``pretrain.method`` gives them.

Every method is a :class:`Method`: it holds the backbone (plus whatever heads, momentum copies,
queues and prototypes it needs, so one ``state_dict`` resumes it exactly), makes its random views
of a batch, and computes its loss. Losses and heads are lightly's; the views follow lightly's
transforms (:mod:`selftrain.pretraining.views`). Adding a method is one module here, its
registration, its name in ``PretrainConfig.method`` and a test.

Example:
    >>> backbone = build_backbone("cnn-tiny", num_classes=0, in_chans=1)
    >>> method = build_method("simclr", backbone, PretrainConfig(), steps=100, image_size=28,
    ...                       channels=1, num_classes=10, mean=[0.29], std=[0.35])
    >>> loss, feats = method.loss(method.views(images), labels, step=0)  # feats: (B, D)
"""

from __future__ import annotations

import torch
from torch import nn

from selftrain.config import PretrainConfig
from selftrain.pretraining.views import MultiView, ViewSpec
from selftrain.registry import Registry

METHODS: Registry = Registry("pre-training method")


class Method(nn.Module):
    """A backbone plus a pre-training objective.

    Args:
        backbone: A timm-style backbone built with ``num_classes=0``.
        cfg: The ``pretrain`` section.
        steps: Total training steps (momentum schedules end at the last one).
        image_size: Side of the run's images; full-size views have this side.
        channels: 1 or 3.
        num_classes: Classes of the pre-training source (0: none).
        mean, std: Per-channel statistics the backbone's input is normalized with.
    """

    #: Whether the method needs a class for every image (supervised pre-training).
    needs_labels = False

    def __init__(
        self, backbone: nn.Module, cfg: PretrainConfig, *, steps: int, image_size: int, channels: int,
        num_classes: int, mean: list[float], std: list[float],
    ) -> None:  # fmt: skip
        super().__init__()
        self.backbone = backbone
        self.cfg, self.steps, self.image_size, self.channels = cfg, steps, image_size, channels
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.augment = self.build_views()

    @property
    def dim(self) -> int:
        return int(self.backbone.num_features)

    def view_specs(self) -> list[ViewSpec]:
        """Two full-size random resized crops (SimCLR, MoCo, BYOL); SwAV adds local crops."""
        return [ViewSpec(self.image_size, tuple(self.cfg.crop_scale), count=2)]

    def build_views(self) -> nn.Module:
        return MultiView(self.view_specs(), self.channels, self.cfg.jitter, self.cfg.blur)

    def views(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The method's views of a float batch (B, C, H, W) in [0, 1]."""
        return self.augment(images)

    def features(self, x: torch.Tensor, backbone: nn.Module | None = None) -> torch.Tensor:
        """Pooled pre-logit features (B, D) of views in [0, 1] (``backbone``: e.g. a momentum copy)."""
        net = backbone if backbone is not None else self.backbone
        return net.forward_head(net.forward_features((x - self.mean) / self.std), pre_logits=True)

    def loss(self, views: list[torch.Tensor], labels: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The objective at ``step`` and the backbone features (B, D) of the first view."""
        raise NotImplementedError


def build_method(name: str, backbone: nn.Module, cfg: PretrainConfig, **kwargs) -> Method:
    """The registered method ``name`` around ``backbone`` (see :class:`Method` for ``kwargs``)."""
    return METHODS.get(name)(backbone, cfg, **kwargs)


# Registration happens on import; the methods import METHODS and Method from above.
from selftrain.pretraining import byol, moco, simclr, supervised, swav  # noqa: E402, F401

__all__ = ["METHODS", "Method", "MultiView", "ViewSpec", "build_method"]
