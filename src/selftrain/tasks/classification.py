"""Image classification: soft-label cross-entropy, top-k accuracy, soft/hard pseudo labels.

Pseudo labels follow Zoph et al. 2020 and Xie et al. 2020 (Noisy Student): the teacher's
softmax at a temperature (soft), or its argmax (hard); filtering by confidence and class
balancing are done by :func:`selftrain.store.select_records` over the whole pool.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy

from selftrain.tasks import TASKS


@TASKS.register("classification")
class Classification:
    """One label per image out of ``num_classes``."""

    name = "classification"
    metric = "top1"  # the headline metric, higher is better
    higher_is_better = True
    dense = False  # one tensor of targets per batch, not one dict per image (selftrain.tasks.dense)
    needs_classes = True  # a labeled source without classes is refused before the task is built

    def __init__(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ValueError(f"classification needs at least 2 classes, got {num_classes}")
        self.num_classes = num_classes

    @classmethod
    def for_classes(cls, classes) -> Classification:
        return cls(len(classes))

    @classmethod
    def for_source(cls, source) -> Classification:
        """The task for a labeled source: one output per class."""
        return cls.for_classes(source.classes)

    # ------------------------------------------------------------------ batches (what the stages call)

    def check_source(self, source, where: str) -> None:
        """Image-level labels are all classification needs; the pipeline checks for them."""

    def load_targets(self, source, indices: np.ndarray, smoothing: float = 0.0) -> torch.Tensor:
        """Target distributions (B, K) of ``source[indices]``."""
        return self.targets(torch.tensor(source.labels[indices]), smoothing)

    def metric_targets(self, source, indices: np.ndarray) -> torch.Tensor:
        """Integer labels (B,) of ``source[indices]``."""
        return torch.tensor(source.labels[indices])

    @staticmethod
    def collate(parts) -> torch.Tensor:
        return torch.cat(list(parts))

    @staticmethod
    def to_device(targets: torch.Tensor, device: torch.device) -> torch.Tensor:
        return targets.to(device)

    @staticmethod
    def augment(aug, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-level labels do not move with the pixels."""
        return aug(images), targets

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().cpu()

    def build_metric(self) -> ClassificationMeter:
        """Collects logits and labels batch by batch; :meth:`metrics` over all of them."""
        return ClassificationMeter(self)

    def targets(self, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
        """Integer labels (B,) -> target distributions (B, K)."""
        one_hot = F.one_hot(labels, self.num_classes).float()
        return one_hot * (1 - smoothing) + smoothing / self.num_classes

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample cross-entropy against target distributions: (B, K), (B, K) -> (B,)."""
        return -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1)

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Top-1 / top-5 accuracy in percent and mean cross-entropy."""
        k = self.num_classes
        out = {
            "top1": 100 * multiclass_accuracy(logits, labels, k, average="micro").item(),
            "loss": F.cross_entropy(logits.float(), labels).item(),
        }
        if k > 5:
            out["top5"] = 100 * multiclass_accuracy(logits, labels, k, top_k=5, average="micro").item()
        return out

    def encode_pseudo(self, logits: torch.Tensor, *, temperature: float = 1.0, hard: bool = False) -> dict[str, np.ndarray]:
        """Teacher logits (B, K) -> store columns.

        ``confidence`` is the maximum of the untempered softmax, so a threshold means the same
        whatever the temperature; ``probs`` is what the student learns (tempered, or one-hot).
        """
        logits = logits.float()
        confidence, label = F.softmax(logits, dim=1).max(dim=1)
        probs = F.one_hot(label, self.num_classes).float() if hard else F.softmax(logits / temperature, dim=1)
        return {
            "classification.probs": probs.cpu().numpy().astype(np.float32),
            "classification.label": label.cpu().numpy().astype(np.int32),
            "classification.confidence": confidence.cpu().numpy().astype(np.float32),
        }

    def pseudo_options(self, label_cfg) -> dict:
        return {"temperature": label_cfg.temperature, "hard": label_cfg.hard}

    def pseudo_fingerprint(self, label_cfg) -> dict:
        return self.pseudo_options(label_cfg)

    def encode_records(self, logits: torch.Tensor, label_cfg) -> dict[str, np.ndarray]:
        """Teacher logits of one batch -> store columns (see :meth:`encode_pseudo`)."""
        return self.encode_pseudo(logits, **self.pseudo_options(label_cfg))

    def pseudo_column_names(self) -> list[str]:
        """The columns the student reads."""
        return ["classification.probs"]

    def pseudo_table_columns(self, encoded: dict[str, np.ndarray] | list[dict[str, np.ndarray]]) -> dict[str, pa.Array]:
        """Encoded columns (one dict, or one per batch of a shard) -> Arrow columns; none keeps the schema."""
        if isinstance(encoded, list):
            if encoded:
                encoded = {k: np.concatenate([part[k] for part in encoded]) for k in encoded[0]}
            else:
                encoded = self.encode_pseudo(torch.zeros(0, self.num_classes))
        probs = encoded["classification.probs"]
        return {
            "classification.probs": pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), self.num_classes),
            "classification.label": pa.array(encoded["classification.label"]),
            "classification.confidence": pa.array(encoded["classification.confidence"]),
        }

    def decode_pseudo(self, table: pa.Table) -> torch.Tensor:
        """Store rows -> target distributions (N, K) for the student."""
        flat = table.column("classification.probs").combine_chunks().flatten().to_numpy()
        return torch.from_numpy(flat.reshape(-1, self.num_classes).copy())


    # ------------------------------------------------------------------ the common pseudo-label view (tasks.base)

    def build_head(self, channels, strides) -> nn.Module:
        """Global average pooling of the coarsest pyramid level + a linear classifier: -> logits (B, K)."""
        return PooledClassifier(int(channels[-1]), self.num_classes)

    def pseudo_targets(self, logits: torch.Tensor, label_cfg) -> tuple[list[dict[str, torch.Tensor]], np.ndarray]:
        """Teacher logits -> ``{"probs": (K,)}`` per image and the top untempered softmax as confidence."""
        columns = self.encode_records(logits, label_cfg)
        probs = torch.from_numpy(columns["classification.probs"])
        return [{"probs": p} for p in probs], columns["classification.confidence"]

    def human_targets(self, source, indices: np.ndarray) -> list[dict[str, torch.Tensor] | None]:
        """One-hot ``probs`` of the source's labels; ``None`` for an image without one (label -1)."""
        labels = np.asarray(source.labels)[np.asarray(indices, dtype=np.int64)]
        return [{"probs": self.targets(torch.tensor([int(c)]))[0]} if c >= 0 else None for c in labels]

    def pseudo_schema(self) -> dict[str, pa.DataType]:
        return {"classification.probs": pa.list_(pa.float32(), self.num_classes), "classification.label": pa.int32(),
                "classification.confidence": pa.float32()}  # fmt: skip

    def record_columns(self, targets) -> dict[str, list]:
        probs = [t["probs"].float() for t in targets]
        return {"classification.probs": [p.tolist() for p in probs], "classification.label": [int(p.argmax()) for p in probs]}

    def decode_rows(self, table: pa.Table) -> list[dict[str, torch.Tensor]]:
        return [{"probs": p} for p in self.decode_pseudo(table)]

    @staticmethod
    def batch_targets(targets) -> torch.Tensor:
        """``{"probs"}`` dicts -> target distributions (B, K), what :meth:`loss` takes."""
        return torch.stack([t["probs"] for t in targets])


class PooledClassifier(nn.Module):
    """The classification head on a feature pyramid: average-pool the coarsest map, then a linear layer."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, features) -> torch.Tensor:
        return self.fc(features[-1].mean(dim=(2, 3)))  # (B, C, H, W) -> (B, K)


class ClassificationMeter:
    """Logits and labels of an evaluation pass; :meth:`Classification.metrics` over all at the end."""

    def __init__(self, task: Classification) -> None:
        self.task = task
        self.logits: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.logits.append(logits)
        self.labels.append(labels)

    def compute(self) -> dict[str, float]:
        logits = torch.cat(self.logits) if self.logits else torch.empty(0)
        labels = torch.cat(self.labels) if self.labels else torch.empty(0, dtype=torch.long)
        return self.task.metrics(logits, labels)
