"""Face verification: an identity embedding, trained on labeled identities, measured on pairs.

The head maps the pooled backbone features to a ``dim``-d embedding, L2-normalised, and keeps one
learned prototype per training identity; the loss is CosFace's (Wang et al. 2018): the
cross-entropy of ``scale * (cos(e, w_c) - margin [c = y])``. The head's output is one tensor
``(B, dim + K)``: the normalised embedding, then the ``K`` cosines (the loss needs both, and
:meth:`Verification.predict` keeps the embedding). Bulat et al. 2021 fine-tune on identities and
test on LFW pairs the same way.

A run's ``data.labeled`` is a source of identities (``imagefolder:DIR`` with one folder per
person) and ``data.test`` a pairs file (``lfw-pairs:PAIRS.txt``): each distinct test image is
embedded once and :func:`selftrain.metrics_faces.verification_metrics` scores every pair by
cosine similarity: ``accuracy`` (10-fold LFW protocol, the headline), ``accuracy_std`` and
``tar@far=...``. The identities of a test set are never the training ones, so a teacher's
"pseudo identity" of a pool image means nothing to the test: **verification has no pseudo
labels** (no ``label``/``student`` stages; the config refuses them). It is an evaluation and
transfer task: how well a pre-trained backbone's features verify faces after fine-tuning or a
linear probe.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from selftrain.metrics_faces import verification_metrics
from selftrain.tasks import TASKS
from selftrain.tasks.decoder import PooledHead
from selftrain.tasks.dense import ImageLevelTask

EMBEDDING_DIM = 64


class EmbeddingHead(nn.Module):
    """Pooled features -> ``(B, dim + K)``: the unit embedding, then its cosine to each identity prototype."""

    def __init__(self, channels: Sequence[int], num_identities: int, dim: int = EMBEDDING_DIM) -> None:
        super().__init__()
        self.embed = PooledHead(channels, dim)
        self.prototypes = nn.Parameter(torch.randn(num_identities, dim) / dim**0.5)

    def forward(self, features) -> torch.Tensor:
        embedding = F.normalize(self.embed(features).float(), dim=1)
        return torch.cat([embedding, embedding @ F.normalize(self.prototypes.float(), dim=1).T], dim=1)


class VerificationMeter:
    """Embeddings of a pairs source's images, by image index; pairs whose images are both embedded
    (a test image that failed to decode drops its pairs) are scored at the end."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.embeddings: dict[int, torch.Tensor] = {}
        self.pairs = None

    def update(self, preds: Sequence[dict], targets: Sequence[dict]) -> None:
        for pred, target in zip(preds, targets):
            self.embeddings[int(target["index"])] = pred["embedding"]
            self.pairs = target["pairs"]

    def compute(self) -> dict[str, float]:
        if self.pairs is None:
            return {}
        p = self.pairs
        keep = np.array([int(a) in self.embeddings and int(b) in self.embeddings for a, b in zip(p.a, p.b)], dtype=bool)
        table = torch.zeros(len(p.images), self.dim)
        for i, e in self.embeddings.items():
            table[i] = e
        return verification_metrics(table, p.a[keep], p.b[keep], p.same[keep], p.fold[keep])


@TASKS.register("verification")
class Verification(ImageLevelTask):
    """An embedding trained on ``num_identities`` identities; measured on verification pairs.

    Args:
        num_identities: Training identities (the labeled source's classes).
        scale, margin: CosFace's scale ``s`` and additive cosine margin ``m`` (16 and 0.2 suit few
            identities; the paper's 64 and 0.35 are for thousands).
        dim: Embedding width.
    """

    name = "verification"
    metric = "accuracy"
    higher_is_better = True
    needs_classes = True
    target_keys = ("labels",)

    def __init__(self, num_identities: int, *, scale: float = 16.0, margin: float = 0.2, dim: int = EMBEDDING_DIM) -> None:
        if num_identities < 2:
            raise ValueError(f"verification needs at least 2 training identities, got {num_identities}")
        self.num_identities, self.scale, self.margin, self.dim = num_identities, scale, margin, dim

    @classmethod
    def for_classes(cls, classes: Sequence[str]) -> Verification:
        return cls(len(classes))

    @property
    def num_classes(self) -> int:
        return self.num_identities

    def check_source(self, source, where: str) -> None:
        """The test set must be a pairs file; the labeled set must name identities."""
        if where == "data.test":
            if getattr(source, "pairs", None) is None:
                raise ValueError(f"data.test={source.uri!r} has no verification pairs; use lfw-pairs:PAIRS.txt?images=DIR")
        elif not source.classes:
            raise ValueError(f"{where}={source.uri!r} names no identities; use imagefolder:DIR with one folder per person")

    def load_targets(self, source, indices: np.ndarray, smoothing: float = 0.0) -> list[dict[str, torch.Tensor]]:
        if smoothing:
            raise ValueError("label smoothing applies to classification only, not to verification")
        return [{"labels": torch.tensor(int(source.labels[int(i)]))} for i in indices]

    def metric_targets(self, source, indices: np.ndarray) -> list[dict]:
        """The pairs file and each image's place in it (what the meter scores at the end)."""
        return [{"index": int(i), "pairs": source.pairs} for i in indices]

    def build_head(self, channels: Sequence[int], strides: Sequence[int]) -> nn.Module:
        return EmbeddingHead(channels, self.num_identities, self.dim)

    def loss(self, outputs: torch.Tensor, targets: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Per-image CosFace loss (B,)."""
        labels = torch.stack([t["labels"] for t in targets]).to(outputs.device).long()
        cosines = outputs.float()[:, self.dim :]
        logits = self.scale * (cosines - self.margin * F.one_hot(labels, self.num_identities))
        return F.cross_entropy(logits, labels, reduction="none")

    def predict(self, outputs: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return [{"embedding": e} for e in outputs.detach().float()[:, : self.dim].cpu()]

    def build_metric(self) -> VerificationMeter:
        return VerificationMeter(self.dim)

    def _no_pseudo_labels(self, *args, **kwargs):
        raise ValueError("verification has no pseudo labels: it is an evaluation and transfer task (no label/student stages)")

    pseudo_schema = pseudo_targets = encode_records = decode_rows = _no_pseudo_labels
