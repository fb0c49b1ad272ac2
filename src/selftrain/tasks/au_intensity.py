"""Action-unit intensity (DISFA / BP4D): multi-output regression, ICC(3,1) and MAE.

One linear output per action unit on the pooled backbone features, trained with mean squared
error on the 0-5 intensities (Bulat et al. 2021 fine-tune with an L2 loss on DISFA). The pseudo
label is the teacher's vector of intensities, clipped to [0, 5] (Zoph et al. 2020: a regression
teacher's output is the target); a regression output has no confidence, so every record's is 1
and ``label.threshold`` must stay 0. Metrics: :func:`selftrain.metrics_faces.au_metrics`,
``icc`` (mean ICC(3,1) over AUs, the headline) and ``mae``, and both per AU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from selftrain.data.annotations.faces import AU_INTENSITY_MAX
from selftrain.metrics_faces import au_metrics
from selftrain.tasks import TASKS
from selftrain.tasks.decoder import PooledHead
from selftrain.tasks.dense import ImageLevelTask, SetMeter, stack_key, vector_column


@TASKS.register("au")
class ActionUnits(ImageLevelTask):
    """``num_units`` intensities per image; targets ``{"au": float32 (K,)}``."""

    name = "au"
    metric = "icc"
    higher_is_better = True
    target_keys = ("au",)

    @classmethod
    def for_classes(cls, classes: Sequence[str]) -> ActionUnits:
        return cls(len(classes))

    @classmethod
    def for_source(cls, source) -> ActionUnits:
        names = getattr(source, "au_names", None)
        if not names:
            raise ValueError(f"{source.uri!r} has no action units to size the au task by (use au:FILE.csv)")
        return cls(len(names), names=names)

    def __init__(self, num_units: int, *, names: Sequence[str] | None = None) -> None:
        if num_units < 1:
            raise ValueError(f"au needs at least 1 action unit, got {num_units}")
        self.num_units = num_units
        self.names = list(names) if names is not None else [f"au{k}" for k in range(num_units)]

    @property
    def num_classes(self) -> int:
        """Outputs: one per action unit (what a saved network spec records)."""
        return self.num_units

    def check_source(self, source, where: str) -> None:
        super().check_source(source, where)
        names = getattr(source, "au_names", None)
        if names is not None and len(names) != self.num_units:
            raise ValueError(f"{where}={source.uri!r} has {len(names)} action units ({', '.join(names)}), the labeled "
                             f"source {self.num_units}")  # fmt: skip

    def build_head(self, channels: Sequence[int], strides: Sequence[int]) -> nn.Module:
        return PooledHead(channels, self.num_units)

    def loss(self, outputs: torch.Tensor, targets: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Per-image mean squared error over the AUs (B,)."""
        target = stack_key(list(targets), "au").to(outputs.device).float()
        return ((outputs.float() - target) ** 2).mean(dim=1)

    def predict(self, outputs: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return [{"au": v} for v in outputs.detach().float().clamp(0, AU_INTENSITY_MAX).cpu()]

    def build_metric(self) -> SetMeter:
        return SetMeter(lambda p, t: au_metrics(stack_key(p, "au"), stack_key(t, "au"), self.names))

    # ------------------------------------------------------------------ pseudo-label store

    def encode_pseudo(self, outputs: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return self.predict(outputs)

    def pseudo_schema(self) -> dict[str, pa.DataType]:
        return {"au.values": pa.list_(pa.float32()), "au.confidence": pa.float32()}

    def record_columns(self, targets) -> dict[str, list]:
        return {"au.values": [t["au"].float().tolist() for t in targets]}

    def record_confidence(self, outputs, targets) -> np.ndarray:
        return np.ones(len(targets), dtype=np.float32)  # a regression output has no confidence

    def decode_rows(self, table: pa.Table) -> list[dict[str, torch.Tensor]]:
        return vector_column(table, "au.values", "au", self.num_units)
