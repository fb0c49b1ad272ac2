"""The pseudo-label interface every task offers, whatever shape its targets have.

Multi-task self-training (:mod:`selftrain.must`) stores the labels of several tasks side by side
and mixes pseudo labels from any model with human ground truth, so it needs one view of a task's
labels that does not depend on where they came from. In that view a label is one ``dict[str,
Tensor]`` per image: the keys of :mod:`selftrain.data.targets` for the dense tasks, ``{"probs": (K,)}``
(a distribution over the classes) for classification. Every task registered in
:data:`selftrain.tasks.TASKS` implements :class:`PseudoLabels`:

==========================  ========================================================================
method                      what it does
==========================  ========================================================================
``build_head``              the task's head on a feature pyramid (channels, strides fine to coarse)
``pseudo_targets``          teacher outputs -> one target dict per image + one confidence per image
``human_targets``           a labeled source's ground truth as target dicts (``None``: no label)
``pseudo_schema``           the task's store columns ``<task>.*``, ``<task>.confidence`` included
``record_columns``          target dicts -> one Python value per image and column
``decode_rows``             store rows -> target dicts (the inverse of ``record_columns``)
``batch_targets``           target dicts of a batch -> what ``loss`` takes
``loss``                    per-image loss (B,), so images without a label can be left out
==========================  ========================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import torch
from torch import nn

Target = dict[str, torch.Tensor]


@runtime_checkable
class PseudoLabels(Protocol):
    """What :mod:`selftrain.must` needs of a task (see the module docstring)."""

    name: str
    dense: bool

    def build_head(self, channels: Sequence[int], strides: Sequence[int]) -> nn.Module: ...

    def pseudo_targets(self, outputs: Any, label_cfg: Any) -> tuple[list[Target], np.ndarray]: ...

    def human_targets(self, source: Any, indices: np.ndarray) -> list[Target | None]: ...

    def pseudo_schema(self) -> dict[str, pa.DataType]: ...

    def record_columns(self, targets: Sequence[Target]) -> dict[str, list]: ...

    def decode_rows(self, table: pa.Table) -> list[Target]: ...

    def batch_targets(self, targets: Sequence[Target]) -> Any: ...

    def loss(self, outputs: Any, targets: Any) -> torch.Tensor: ...
