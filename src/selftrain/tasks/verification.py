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
``tar@far=...``.

**Pseudo labels are a teacher's embeddings** (embedding distillation), never identities: the
identities of a test set are never the training ones, so a "pseudo identity" of a pool image
means nothing to the test, while an embedding does. The teacher is a face model that gives
embeddings (``label.teacher: dlib:embedding``, :mod:`selftrain.face_teachers`); a trained
selftrain verification network is not a teacher (the config refuses ``label``/``student`` without
an embedding teacher). The store keeps each pool face's embedding as the teacher gave it
(``verification.embedding``, any width) with the face's confidence. The student learns them by
**relational distillation** (:func:`embedding_distillation_loss`, the similarity-preserving
distillation of Tung & Mori 2019 with cosines): for the pseudo-labelled images of a batch it
matches the cosine of every pair of its embeddings to the cosine of the teacher's. Verification
reads nothing but the cosines of pairs, so that is what is transferred, whatever the two
embeddings' widths (dlib's 128, the student's 64) and without a projection layer in the saved
network. The teacher's cosines are taken as they are, although dlib's embeddings lie in a narrow
cone (on scikit-image's LFW crops two different photos have a cosine of about 0.86, two views of
one photo 0.98): centring them on their mean first gave, when we tried it, a student that verified
worse (README, Face teachers). A human image keeps its CosFace loss; both are per image, so the
student's loss normalization weighs them as for any task.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from selftrain.metrics_faces import verification_metrics
from selftrain.tasks import TASKS
from selftrain.tasks.decoder import PooledHead
from selftrain.tasks.dense import ImageLevelTask

EMBEDDING_DIM = 64
#: The store column of a teacher's embeddings (list<float32>, any width).
EMBEDDING_COLUMN = "verification.embedding"


class EmbeddingHead(nn.Module):
    """Pooled features -> ``(B, dim + K)``: the unit embedding, then its cosine to each identity prototype."""

    def __init__(self, channels: Sequence[int], num_identities: int, dim: int = EMBEDDING_DIM) -> None:
        super().__init__()
        self.embed = PooledHead(channels, dim)
        self.prototypes = nn.Parameter(torch.randn(num_identities, dim) / dim**0.5)

    def forward(self, features) -> torch.Tensor:
        embedding = F.normalize(self.embed(features).float(), dim=1)
        return torch.cat([embedding, embedding @ F.normalize(self.prototypes.float(), dim=1).T], dim=1)


def embedding_distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Relational embedding distillation, per image: ``(P,)`` from ``(P, d)`` student and ``(P, D)``
    teacher embeddings of the same ``P`` images (``d`` and ``D`` may differ).

    Image ``i``'s loss is ``mean_{j != i} (cos(s_i, s_j) - cos(t_i, t_j))^2``; its mean over the
    batch is the mean squared difference of the two off-diagonal cosine matrices.

    Raises:
        ValueError: fewer than 2 images (there is no pair), or not as many teacher as student rows.
    """
    n = len(student)
    if len(teacher) != n:
        raise ValueError(f"embedding distillation: {n} student and {len(teacher)} teacher embeddings")
    if n < 2:
        raise ValueError("embedding distillation compares pairs of images: a batch needs at least 2 with a teacher's "
                         "embedding (student.pseudo_batch_size >= 2 per process)")  # fmt: skip
    s, t = F.normalize(student.float(), dim=1), F.normalize(teacher.float(), dim=1)
    gap = (s @ s.T - t @ t.T) ** 2
    off = 1.0 - torch.eye(n, device=gap.device, dtype=gap.dtype)
    return (gap * off).sum(dim=1) / (n - 1)


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
        """Per-image loss (B,): CosFace for an image with an identity (``labels``), and
        :func:`embedding_distillation_loss` among the images with a teacher's ``embedding``."""
        outputs, targets = outputs.float(), list(targets)
        human = [n for n, t in enumerate(targets) if "labels" in t]
        taught = [n for n, t in enumerate(targets) if "embedding" in t]
        if len(human) + len(taught) != len(targets):
            raise ValueError("verification: every target needs an identity (labels) or a teacher's embedding (embedding)")
        loss = outputs.new_zeros(len(targets))
        if human:
            rows = torch.tensor(human, device=outputs.device)
            labels = torch.stack([targets[n]["labels"] for n in human]).to(outputs.device).long()
            logits = self.scale * (outputs[rows, self.dim :] - self.margin * F.one_hot(labels, self.num_identities))
            loss = loss.index_put((rows,), F.cross_entropy(logits, labels, reduction="none"))
        if taught:
            rows = torch.tensor(taught, device=outputs.device)
            teacher = torch.stack([targets[n]["embedding"] for n in taught]).to(outputs.device)
            loss = loss.index_put((rows,), embedding_distillation_loss(outputs[rows, : self.dim], teacher))
        return loss

    def predict(self, outputs: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return [{"embedding": e} for e in outputs.detach().float()[:, : self.dim].cpu()]

    def build_metric(self) -> VerificationMeter:
        return VerificationMeter(self.dim)

    # ------------------------------------------------------------------ pseudo-label store

    #: What a teacher's pseudo label holds (its human targets are ``labels``).
    pseudo_keys = ("embedding",)

    def pseudo_schema(self) -> dict[str, pa.DataType]:
        return {EMBEDDING_COLUMN: pa.list_(pa.float32()), "verification.confidence": pa.float32()}

    def record_columns(self, targets) -> dict[str, list]:
        return {EMBEDDING_COLUMN: [t["embedding"].float().reshape(-1).tolist() for t in targets]}

    def decode_rows(self, table: pa.Table) -> list[dict[str, torch.Tensor]]:
        """Store rows -> the teacher's embeddings (ValueError if they differ in width)."""
        values = table.column(EMBEDDING_COLUMN).to_pylist()
        widths = sorted({len(v) for v in values})
        if len(widths) > 1:
            raise ValueError(f"{EMBEDDING_COLUMN}: the store mixes embeddings of widths {widths}")
        return [{"embedding": torch.tensor(v, dtype=torch.float32)} for v in values]

    def _no_trained_teacher(self, *args, **kwargs):
        raise ValueError("verification learns pseudo labels from an embedding teacher only (label.teacher: dlib:embedding): "
                         "a trained network's pseudo identities mean nothing on a test set's identities")  # fmt: skip

    encode_pseudo = record_confidence = _no_trained_teacher
