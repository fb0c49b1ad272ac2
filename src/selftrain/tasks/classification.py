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
from torchmetrics.functional.classification import multiclass_accuracy

from selftrain.tasks import TASKS


@TASKS.register("classification")
class Classification:
    """One label per image out of ``num_classes``."""

    name = "classification"
    metric = "top1"  # the headline metric, higher is better

    def __init__(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ValueError(f"classification needs at least 2 classes, got {num_classes}")
        self.num_classes = num_classes

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

    def pseudo_table_columns(self, encoded: dict[str, np.ndarray]) -> dict[str, pa.Array]:
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
