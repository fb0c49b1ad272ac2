"""Emotion (AffectNet): expression classification plus valence/arousal regression.

One head on the pooled backbone features gives ``K`` expression logits and two values squashed
to [-1, 1] by ``tanh`` (valence, arousal). The loss is the cross-entropy of the logits against
a target distribution plus the mean squared error of valence and arousal (weight ``va_weight``);
Bulat et al. 2021 fine-tune both jointly on AffectNet. Pseudo labels follow classification
(Zoph et al. 2020): the teacher's softmax at ``label.temperature`` (or one-hot with
``label.hard``), its confidence the top untempered probability (what ``label.threshold``
filters), and the teacher's valence/arousal as regression targets. Metrics:
:func:`selftrain.metrics_faces.emotion_metrics`, ``accuracy`` (%, the headline),
``ccc_valence``, ``ccc_arousal`` (Lin's CCC) and their MAE.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from selftrain.metrics_faces import emotion_metrics
from selftrain.tasks import TASKS
from selftrain.tasks.decoder import PooledHead
from selftrain.tasks.dense import ImageLevelTask, SetMeter, stack_key


class EmotionHead(nn.Module):
    """Pooled features -> ``(B, K + 2)``: expression logits, then ``tanh`` valence and arousal."""

    def __init__(self, channels: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.linear = PooledHead(channels, num_classes + 2)

    def forward(self, features) -> torch.Tensor:
        out = self.linear(features)
        return torch.cat([out[:, :-2], torch.tanh(out[:, -2:])], dim=1)


def _emotion_set_metrics(preds: Sequence[dict], targets: Sequence[dict]) -> dict[str, float]:
    return emotion_metrics(stack_key(preds, "probs"), stack_key(targets, "probs").argmax(dim=1),
                           stack_key(preds, "valence_arousal"), stack_key(targets, "valence_arousal"))  # fmt: skip


@TASKS.register("emotion")
class Emotion(ImageLevelTask):
    """Targets ``{"probs": (K,), "valence_arousal": (2,)}``: one-hot expressions from a labeled source."""

    name = "emotion"
    metric = "accuracy"
    higher_is_better = True
    needs_classes = True
    target_keys = ("labels", "valence_arousal")

    def __init__(self, num_classes: int, *, va_weight: float = 1.0) -> None:
        if num_classes < 2:
            raise ValueError(f"emotion needs at least 2 expressions, got {num_classes}")
        self.num_classes = num_classes
        self.va_weight = va_weight

    @classmethod
    def for_classes(cls, classes: Sequence[str]) -> Emotion:
        return cls(len(classes))

    def load_targets(self, source, indices: np.ndarray, smoothing: float = 0.0) -> list[dict[str, torch.Tensor]]:
        """One-hot (optionally smoothed) expression distributions and valence/arousal."""
        out = []
        for i in indices:
            target = source.load_targets(int(i))
            probs = F.one_hot(target["labels"].reshape(-1)[:1].long(), self.num_classes).float()[0]
            out.append({"probs": probs * (1 - smoothing) + smoothing / self.num_classes,
                        "valence_arousal": target["valence_arousal"].float()})  # fmt: skip
        return out

    def metric_targets(self, source, indices: np.ndarray) -> list[dict[str, torch.Tensor]]:
        return self.load_targets(source, indices)

    def build_head(self, channels: Sequence[int], strides: Sequence[int]) -> nn.Module:
        return EmotionHead(channels, self.num_classes)

    def loss(self, outputs: torch.Tensor, targets: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Per-image soft cross-entropy + ``va_weight`` x mean squared valence/arousal error (B,)."""
        probs = stack_key(list(targets), "probs").to(outputs.device).float()
        va = stack_key(list(targets), "valence_arousal").to(outputs.device).float()
        outputs = outputs.float()
        cross_entropy = -(probs * F.log_softmax(outputs[:, :-2], dim=1)).sum(dim=1)
        return cross_entropy + self.va_weight * ((outputs[:, -2:] - va) ** 2).mean(dim=1)

    def predict(self, outputs: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        outputs = outputs.detach().float().cpu()
        return [{"probs": p, "valence_arousal": v} for p, v in zip(outputs[:, :-2].softmax(dim=1), outputs[:, -2:])]

    def build_metric(self) -> SetMeter:
        return SetMeter(_emotion_set_metrics)

    # ------------------------------------------------------------------ pseudo-label store

    def pseudo_options(self, label_cfg) -> dict:
        return {"temperature": label_cfg.temperature, "hard": label_cfg.hard}

    def encode_pseudo(self, outputs: torch.Tensor, *, temperature: float = 1.0, hard: bool = False) -> list[dict]:
        outputs = outputs.detach().float().cpu()
        logits = outputs[:, :-2]
        probs = F.one_hot(logits.argmax(dim=1), self.num_classes).float() if hard else (logits / temperature).softmax(dim=1)
        return [{"probs": p, "valence_arousal": v} for p, v in zip(probs, outputs[:, -2:])]

    def record_confidence(self, outputs: torch.Tensor, targets) -> np.ndarray:
        """The top untempered softmax, so a threshold means the same whatever the temperature."""
        return outputs.detach().float()[:, :-2].softmax(dim=1).amax(dim=1).cpu().numpy()

    def pseudo_schema(self) -> dict[str, pa.DataType]:
        return {"emotion.probs": pa.list_(pa.float32(), self.num_classes), "emotion.label": pa.int32(),
                "emotion.valence_arousal": pa.list_(pa.float32(), 2), "emotion.confidence": pa.float32()}  # fmt: skip

    def record_columns(self, targets) -> dict[str, list]:
        return {"emotion.probs": [t["probs"].float().tolist() for t in targets],
                "emotion.label": [int(t["probs"].argmax()) for t in targets],
                "emotion.valence_arousal": [t["valence_arousal"].float().tolist() for t in targets]}  # fmt: skip

    def decode_rows(self, table: pa.Table) -> list[dict[str, torch.Tensor]]:
        probs = table.column("emotion.probs").to_pylist()
        va = table.column("emotion.valence_arousal").to_pylist()
        return [{"probs": torch.tensor(p, dtype=torch.float32), "valence_arousal": torch.tensor(v, dtype=torch.float32)}
                for p, v in zip(probs, va)]  # fmt: skip

    def quality_meter(self) -> SetMeter:
        return self.build_metric()
