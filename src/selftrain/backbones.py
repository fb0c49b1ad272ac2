"""Backbones by name: selftrain's small CPU-friendly CNNs, or any timm model.

Every backbone follows timm's interface (``forward_features``, ``forward_head``,
``num_features``, ``reset_classifier``), so stages treat ours and timm's alike. Weights come
from a local file only; nothing is ever downloaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from selftrain.registry import Registry

log = logging.getLogger("selftrain.backbones")
BACKBONES: Registry = Registry("backbone")


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _pyramid(features: nn.Sequential, ends: tuple[int, ...], x: torch.Tensor) -> list[torch.Tensor]:
    """Runs ``features`` and keeps the output of each layer whose index is in ``ends``."""
    maps = []
    for i, layer in enumerate(features):
        x = layer(x)
        if i in ends:
            maps.append(x)
    return maps


class SmallCNN(nn.Module):
    """A VGG-style 5-conv network for 28-32 px images; ~0.1M parameters at width 24.

    It trains at roughly 1,000 images/s on two CPU cores in fp32, which makes the full
    teach -> label -> student loop fit in minutes on a laptop.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 24, drop_rate: float = 0.0) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn(in_chans, w), _conv_bn(w, w), nn.MaxPool2d(2),
            _conv_bn(w, 2 * w), _conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
            _conv_bn(2 * w, 4 * w),
        )  # fmt: skip
        self.num_features = 4 * w
        self.drop_rate = drop_rate
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (B, C, H/4, W/4)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x).flatten(1)  # (B, C)
        return x if pre_logits else self.fc(self.head_drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    #: Indices into ``features`` after which a pyramid level ends (just before each pooling).
    pyramid_ends = (1, 4, 6)

    @property
    def pyramid_channels(self) -> list[int]:
        """Channels of the :meth:`forward_pyramid` maps: ``[w, 2w, 4w]``."""
        w = self.num_features // 4
        return [w, 2 * w, 4 * w]

    @property
    def pyramid_strides(self) -> list[int]:
        return [1, 2, 4]

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of each conv group, fine to coarse: (B, w, H, W), (B, 2w, H/2, W/2), (B, 4w, H/4, W/4).

        The maps are taken just before each pooling, so the finest level keeps full resolution for
        dense heads; the same ``features`` modules run, so a classification checkpoint applies as is.
        """
        return _pyramid(self.features, self.pyramid_ends, x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


@BACKBONES.register("cnn-small")
def cnn_small(**kwargs) -> nn.Module:
    return SmallCNN(width=24, **kwargs)


@BACKBONES.register("cnn-tiny")
def cnn_tiny(**kwargs) -> nn.Module:
    """Width 8: for tests and smoke runs."""
    return SmallCNN(width=8, **kwargs)


@BACKBONES.register("cnn-base")
def cnn_base(**kwargs) -> nn.Module:
    return SmallCNN(width=48, **kwargs)


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Loads a local state dict (safetensors, or torch with ``weights_only=True``) into ``model``.

    The classifier is skipped when its shape differs (a backbone pre-trained for other classes).
    """
    from selftrain.checkpoint import read_state_dict

    _load_state(model, read_state_dict(path), path)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Loads ``state`` non-strictly, dropping shape mismatches and logging what did not load."""
    own = model.state_dict()
    if not set(state) & set(own):
        raise ValueError(f"{path}: no parameter matches the {type(model).__name__} backbone")
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for k in skipped:
        state.pop(k)
    result = model.load_state_dict(state, strict=False)
    head = _classifier_keys(model)
    if result.missing_keys and set(result.missing_keys) <= head and not skipped:  # a backbone without its classifier
        log.info("%s: loaded the backbone; the classifier (%s) starts fresh", path, ", ".join(sorted(head)))
    elif result.missing_keys or skipped:
        log.warning(
            "%s: %d keys missing from the file, %d skipped for shape: %s",
            path, len(result.missing_keys), len(skipped), (result.missing_keys + skipped)[:6],
        )  # fmt: skip


def _classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the model's classifier (timm's ``get_classifier()``), empty when it has none."""
    get = getattr(model, "get_classifier", None)
    classifier = get() if callable(get) else None
    for name, module in model.named_modules():
        if module is classifier and name:
            return {f"{name}.{k}" for k in module.state_dict()}
    return set()


def build_backbone(name: str, *, num_classes: int, in_chans: int, drop_rate: float = 0.0, weights: str | None = None) -> nn.Module:
    """Builds a registered backbone, or falls back to ``timm.create_model(name)`` (no download)."""
    if name in BACKBONES:
        model = BACKBONES.get(name)(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
    else:
        import timm

        if not timm.is_model(name):
            raise ValueError(f"unknown backbone {name!r}: not one of {BACKBONES.names()} nor a timm model name")
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
    if weights:
        load_weights(model, weights)
    return model


# --------------------------------------------------------------------------- feature pyramids


class FeatureBackbone(nn.Module):
    """A backbone that returns a feature pyramid, for the dense tasks' decoders.

    ``forward(x)`` returns one map per level, fine to coarse; level ``i`` has ``channels[i]``
    channels and ``strides[i]`` input pixels per map pixel. Dense heads only need these two lists,
    so selftrain's small CNNs and any timm model look alike to them.

    Attributes:
        channels: Channels of each level, fine to coarse.
        strides: Stride of each level relative to the input, fine to coarse (increasing).
        weight_prefix: What to put before a plain backbone's parameter names so they match this
            module's own (the wrapper's attribute name), used when loading a classification checkpoint.
    """

    channels: list[int]
    strides: list[int]
    weight_prefix: str = ""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError


class SmallCNNFeatures(FeatureBackbone):
    """The conv groups of :class:`SmallCNN` at strides 1, 2 and 4.

    Holds ``features`` itself (not a whole ``SmallCNN``), so its parameter names are exactly the
    classification model's (``features.0.0.weight`` ...) and its checkpoints load unchanged.
    """

    def __init__(self, cnn: SmallCNN) -> None:
        super().__init__()
        self.features = cnn.features
        self.channels = cnn.pyramid_channels
        self.strides = cnn.pyramid_strides
        self.ends = cnn.pyramid_ends

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return _pyramid(self.features, self.ends, x)


class TimmFeatures(FeatureBackbone):
    """A timm model built with ``features_only=True``; levels and strides from its ``feature_info``."""

    weight_prefix = "body."

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.channels = list(body.feature_info.channels())
        self.strides = list(body.feature_info.reduction())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x))


def build_feature_backbone(name: str, *, in_chans: int, weights: str | None = None) -> FeatureBackbone:
    """Builds the feature-pyramid form of backbone ``name`` (selftrain's CNNs or any timm model).

    Args:
        name: A registered SmallCNN name (``cnn-tiny``/``cnn-small``/``cnn-base``: levels at strides
            1, 2, 4) or a timm model name (``features_only=True``: usually strides 2 to 32).
        in_chans: Input channels.
        weights: Optional local weights file: a backbone state dict or a whole classification
            network's (``backbone.``-prefixed, as the stages export); the classifier is ignored.

    Raises:
        ValueError: ``name`` is neither registered nor a timm model, or ``weights`` matches nothing.
    """
    if name in BACKBONES:
        model = BACKBONES.get(name)(num_classes=0, in_chans=in_chans)
        if not isinstance(model, SmallCNN):
            raise ValueError(f"backbone {name!r} has no feature-pyramid form")
        backbone: FeatureBackbone = SmallCNNFeatures(model)
    else:
        import timm

        if not timm.is_model(name):
            raise ValueError(f"unknown backbone {name!r}: not one of {BACKBONES.names()} nor a timm model name")
        backbone = TimmFeatures(timm.create_model(name, pretrained=False, features_only=True, in_chans=in_chans))
    if weights:
        from selftrain.checkpoint import read_state_dict

        state = read_state_dict(weights)
        if any(k.startswith("backbone.") for k in state):  # a whole Network: keep its backbone only
            state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        _load_state(backbone, {backbone.weight_prefix + k: v for k, v in state.items()}, weights)
    return backbone
