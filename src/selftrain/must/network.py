"""The multi-task student: one shared backbone with a feature pyramid and one head per task.

Ghiasi et al. 2021 (MuST) train one network on every teacher's pseudo labels: a shared backbone
whose feature pyramid feeds a head per task. The heads are the tasks' own (``task.build_head``:
the FPN decoders of segmentation, depth and keypoints, FCOS for detection, a pooled linear
classifier for classification), so a head here is the same module a single-task run trains.
The backbone alone is what transfers (:func:`backbone_state`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from selftrain.backbones import build_feature_backbone
from selftrain.checkpoint import read_state_dict
from selftrain.tasks import TASKS


@dataclass
class HeadSpec:
    """One head: the teacher's name (``key``), its task and that task's size."""

    key: str
    task: str
    num_classes: int


@dataclass
class MultiTaskSpec:
    """Everything needed to rebuild the student and feed it images (saved as ``model.json``)."""

    backbone: str
    channels: int
    image_size: int
    mean: list[float]
    std: list[float]
    heads: list[HeadSpec]

    @classmethod
    def from_dict(cls, raw: dict) -> MultiTaskSpec:
        return cls(**{**raw, "heads": [HeadSpec(**h) for h in raw["heads"]]})


def build_head_task(head: HeadSpec):
    """The task object a head is built from (sized by ``num_classes``; depth ignores it)."""
    return TASKS.get(head.task)(head.num_classes)


class MultiTaskNetwork(nn.Module):
    """``heads[key](backbone(normalize(x)))`` for every task ``key``.

    ``forward`` gives every head's outputs; the student instead calls :meth:`features` once and
    each head on the images that have its task (:meth:`head_outputs`).
    """

    def __init__(self, spec: MultiTaskSpec, weights: str | None = None, tasks: dict | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = build_feature_backbone(spec.backbone, in_chans=spec.channels, weights=weights)
        tasks = tasks or {h.key: build_head_task(h) for h in spec.heads}
        self.heads = nn.ModuleDict({h.key: tasks[h.key].build_head(self.backbone.channels, self.backbone.strides) for h in spec.heads})
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Float images in [0, 1] (B, C, H, W) -> the shared pyramid, fine to coarse."""
        return self.backbone((x - self.mean) / self.std)

    def head_outputs(self, key: str, features: list[torch.Tensor], rows: torch.Tensor | None = None):
        """Head ``key`` on the pyramid, or on its images ``rows`` only (B',)."""
        if rows is not None:
            features = [f[rows] for f in features]
        return self.heads[key](features)

    def forward(self, x: torch.Tensor) -> dict:
        features = self.features(x)
        return {key: head(features) for key, head in self.heads.items()}


class HeadView(nn.Module):
    """One head of a multi-task network as a single-task model: images -> that task's outputs.

    What the evaluation of :func:`selftrain.transfer.evaluate` takes (it calls ``net(x)``).
    """

    def __init__(self, net: MultiTaskNetwork, key: str) -> None:
        super().__init__()
        self.net, self.key = net, key

    def forward(self, x: torch.Tensor):
        return self.net.head_outputs(self.key, self.net.features(x))


def backbone_state(net: MultiTaskNetwork) -> dict[str, torch.Tensor]:
    """The backbone's weights under the names a plain backbone has (what ``model.weights`` loads).

    A selftrain CNN's pyramid holds ``features.*`` exactly as the classification model does; a timm
    pyramid wraps the model as ``body.*``, which is removed.
    """
    prefix = net.backbone.weight_prefix
    return {k.removeprefix(prefix): v for k, v in net.backbone.state_dict().items()}


def load_multitask_network(path: str | Path) -> MultiTaskNetwork:
    """Loads ``model.safetensors`` and its ``model.json`` spec into a :class:`MultiTaskNetwork`."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: its spec file {meta_path.name} is missing; was it written by selftrain must?")
    net = MultiTaskNetwork(MultiTaskSpec.from_dict(json.loads(meta_path.read_text())["spec"]))
    net.load_state_dict(read_state_dict(path))
    return net


def spec_dict(spec: MultiTaskSpec) -> dict:
    return asdict(spec)
